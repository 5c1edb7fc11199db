//! TLS to the database server, configured in the connection URL as libpq
//! (and so psycopg2, Glance's driver) reads it: `sslmode`, `sslrootcert`,
//! `sslcert`, `sslkey`. rustls does the TLS.
//!
//! | `sslmode` | TLS | the server's certificate |
//! | --- | --- | --- |
//! | `disable` | never | - |
//! | `allow`, `prefer` (the default) | if the server offers it | not checked (as libpq) |
//! | `require` | always | not checked; checked against `sslrootcert` (not the name) when one is given, as libpq |
//! | `verify-ca` | always | signed by `sslrootcert` (else `~/.postgresql/root.crt`, else the web's roots) |
//! | `verify-full` | always | as `verify-ca`, and issued for the host connected to |
//!
//! `client_encoding=utf8` (which SQLAlchemy URLs often carry) is accepted
//! and dropped: the host always speaks UTF-8. Any other encoding is
//! refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// What `sslmode` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS parameters of a connection URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: Mode,
    pub root_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Why a URL's TLS parameters cannot be used. The message names the
/// parameter (and the file) as given, never the rest of the URL.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("sslmode={0:?} is not one of disable, allow, prefer, require, verify-ca, verify-full")]
    SslMode(String),
    #[error("client_encoding={0:?}: the cache speaks UTF8 only")]
    ClientEncoding(String),
    #[error("sslcert and sslkey go together: give both or neither")]
    CertWithoutKey,
    /// A certificate file (`sslcert`, `sslrootcert`) that cannot be read
    /// or holds no PEM certificate.
    #[error("{}: {message}", path.display())]
    CertificateFile { path: PathBuf, message: String },
    /// A certificate of `sslrootcert` that cannot be a trust anchor.
    #[error("sslrootcert {}: {message}", path.display())]
    RootCertificate { path: PathBuf, message: String },
    /// The `sslkey` file cannot be read.
    #[error("sslkey {}: {message}", path.display())]
    Key { path: PathBuf, message: String },
    /// The client certificate and key do not make a client identity.
    #[error("sslcert/sslkey: {0}")]
    ClientIdentity(String),
    /// rustls refused the configuration.
    #[error("TLS: {0}")]
    Setup(String),
}

/// Take the TLS parameters (and `client_encoding`) out of a libpq URL or
/// key=value string: the rest, for tokio-postgres, and the settings.
pub fn split(url: &str) -> Result<(String, TlsSettings), TlsError> {
    let mut settings = TlsSettings {
        mode: Mode::Prefer,
        root_cert: None,
        client_cert: None,
        client_key: None,
    };
    let mut take = |key: &str, value: &str| -> Result<bool, TlsError> {
        match key {
            "sslmode" => {
                settings.mode = match value {
                    "disable" => Mode::Disable,
                    "allow" | "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => return Err(TlsError::SslMode(other.to_string())),
                }
            }
            "sslrootcert" => settings.root_cert = Some(PathBuf::from(value)),
            "sslcert" => settings.client_cert = Some(PathBuf::from(value)),
            "sslkey" => settings.client_key = Some(PathBuf::from(value)),
            "client_encoding" => {
                if !matches!(
                    value.to_ascii_lowercase().replace(['-', '_'], "").as_str(),
                    "utf8" | "unicode"
                ) {
                    return Err(TlsError::ClientEncoding(value.to_string()));
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if let Some((base, query)) = url.split_once('?')
        && url.contains("://")
    {
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(&decode(k), &decode(v))? {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else if !url.contains("://") {
        let mut kept = Vec::new();
        for token in url.split_whitespace() {
            let (k, v) = token.split_once('=').unwrap_or((token, ""));
            if !take(k, v.trim_matches('\''))? {
                kept.push(token);
            }
        }
        kept.join(" ")
    } else {
        url.to_string()
    };
    if settings.client_cert.is_some() != settings.client_key.is_some() {
        return Err(TlsError::CertWithoutKey);
    }
    Ok((rest, settings))
}

/// `%XX` decoding of a URL query component.
fn decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TlsSettings {
    /// tokio-postgres's side: whether TLS is tried, or required.
    pub fn ssl_mode(&self) -> SslMode {
        match self.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }

    /// The connector: rustls with the verification the mode asks for.
    pub fn connector(&self) -> Result<MakeRustlsConnect, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let roots = || self.roots();
        let verifier: Arc<dyn ServerCertVerifier> = match (self.mode, &self.root_cert) {
            (Mode::VerifyFull, _) => webpki(roots()?, &provider)?,
            (Mode::VerifyCa, _) | (Mode::Require, Some(_)) => {
                Arc::new(AnyName(webpki(roots()?, &provider)?))
            }
            _ => Arc::new(Unchecked(provider.signature_verification_algorithms)),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let certs = read_certs(cert)?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
                    path: key.clone(),
                    message: e.to_string(),
                })?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| TlsError::ClientIdentity(e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }

    /// The CA certificates to check the server against.
    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        let default = std::env::var_os("HOME")
            .map(|h| Path::new(&h).join(".postgresql/root.crt"))
            .filter(|p| p.is_file());
        match self.root_cert.as_ref().or(default.as_ref()) {
            Some(path) => {
                for cert in read_certs(path)? {
                    roots.add(cert).map_err(|e| TlsError::RootCertificate {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        Ok(roots)
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |message: String| TlsError::CertificateFile {
        path: path.to_path_buf(),
        message,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".to_string()));
    }
    Ok(certs)
}

fn webpki(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Setup(e.to_string()))
}

/// `verify-ca`: the chain must lead to a trusted root; the name may be any.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require` without a root: libpq encrypts without checking who
/// answers (the handshake's signatures are still checked).
#[derive(Debug)]
struct Unchecked(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_come_out_of_urls() {
        let (rest, s) = split(
            "postgresql://u:p@h/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5&client_encoding=utf8",
        )
        .unwrap();
        assert_eq!(rest, "postgresql://u:p@h/db?connect_timeout=5");
        assert_eq!(s.mode, Mode::VerifyFull);
        assert_eq!(s.root_cert.as_deref(), Some(Path::new("/etc/ca.pem")));
        let (rest, s) = split("postgresql://u@h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgresql://u@h/db");
        assert_eq!(s.mode, Mode::Require);
        assert_eq!(s.ssl_mode(), SslMode::Require);
        let (rest, s) = split("host=/run/pg dbname=g sslmode=disable").unwrap();
        assert_eq!(rest, "host=/run/pg dbname=g");
        assert_eq!(s.mode, Mode::Disable);
        let (_, s) = split("postgresql://u@h/db").unwrap();
        assert_eq!(s.mode, Mode::Prefer);
        assert_eq!(
            split("postgresql://u@h/db?sslmode=sometimes")
                .unwrap_err()
                .to_string(),
            "sslmode=\"sometimes\" is not one of disable, allow, prefer, require, verify-ca, verify-full"
        );
        assert_eq!(
            split("postgresql://u@h/db?client_encoding=latin1").unwrap_err(),
            TlsError::ClientEncoding("latin1".into())
        );
        assert_eq!(
            split("postgresql://u@h/db?sslcert=/c.pem").unwrap_err(),
            TlsError::CertWithoutKey
        );
    }
}
