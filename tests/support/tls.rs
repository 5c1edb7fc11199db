//! Certificates the tests make for their database servers' TLS.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};

fn ca(name: &str) -> (Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("CA key");
    (params.self_signed(&key).expect("CA certificate"), key)
}

/// A CA named `name` and a server certificate for `localhost` it signed
/// (not for 127.0.0.1: the name check has something to fail on):
/// `server.crt` and `server.key` in `server_dir`, the CA as `ca.crt` in
/// `ca_dir` (world-readable), whose path is returned.
pub fn localhost_certificate(server_dir: &Path, ca_dir: &Path, name: &str) -> PathBuf {
    let (ca, ca_key) = ca(name);
    let server_key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .expect("server params")
        .signed_by(&server_key, &ca, &ca_key)
        .expect("server certificate");
    std::fs::write(server_dir.join("server.crt"), server.pem()).expect("server.crt");
    std::fs::write(server_dir.join("server.key"), server_key.serialize_pem()).expect("server.key");
    let ca_file = ca_dir.join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).expect("ca.crt");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        server_dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("server.key mode");
    std::fs::set_permissions(&ca_file, std::fs::Permissions::from_mode(0o644)).expect("ca mode");
    ca_file
}

/// Another CA, which signed nothing the servers show, as `file`.
pub fn unrelated_ca(file: &Path) {
    std::fs::write(file, ca("an unrelated CA").0.pem()).expect("unrelated CA");
}
