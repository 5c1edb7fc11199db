//! Expected checksums of image bytes: md5 (Glance's `checksum`) and
//! sha256/sha512 (Glance's `os_hash_value`).

use std::fmt;
use std::str::FromStr;

use md5::Md5;
use sha2::{Digest, Sha256, Sha512};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "md5",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Md5 => 32,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// An expected digest: `md5:HEX`, `sha256:HEX`, `sha512:HEX`, or bare hex
/// whose length says which (32, 64, 128 digits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checksum {
    pub algorithm: Algorithm,
    /// Lower-case hex digits.
    pub hex: String,
}

impl FromStr for Checksum {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (algorithm, hex) = match s.split_once(':') {
            Some((name, hex)) => {
                let algorithm = match name.to_ascii_lowercase().as_str() {
                    "md5" => Algorithm::Md5,
                    "sha256" => Algorithm::Sha256,
                    "sha512" => Algorithm::Sha512,
                    other => {
                        return Err(format!(
                            "unknown checksum algorithm {other:?} (use md5, sha256 or sha512)"
                        ));
                    }
                };
                (algorithm, hex)
            }
            None => {
                let algorithm = match s.len() {
                    32 => Algorithm::Md5,
                    64 => Algorithm::Sha256,
                    128 => Algorithm::Sha512,
                    _ => {
                        return Err(format!(
                            "checksum {s:?}: write it as md5:HEX, sha256:HEX or sha512:HEX"
                        ));
                    }
                };
                (algorithm, s)
            }
        };
        if hex.len() != algorithm.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "checksum {s:?}: a {} digest is {} hex digits",
                algorithm.name(),
                algorithm.hex_len()
            ));
        }
        Ok(Checksum {
            algorithm,
            hex: hex.to_ascii_lowercase(),
        })
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

/// A running digest of one algorithm.
pub enum Hasher {
    Md5(Md5),
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Md5 => Hasher::Md5(Md5::new()),
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest as lower-case hex.
    pub fn finish(self) -> String {
        match self {
            Hasher::Md5(h) => hex::encode(h.finalize()),
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prefixed_and_bare_digests() {
        let md5: Checksum = "md5:D41D8CD98F00B204E9800998ECF8427E".parse().unwrap();
        assert_eq!(md5.algorithm, Algorithm::Md5);
        assert_eq!(md5.hex, "d41d8cd98f00b204e9800998ecf8427e");
        let bare: Checksum = "d41d8cd98f00b204e9800998ecf8427e".parse().unwrap();
        assert_eq!(bare, md5);
        assert!(
            "sha1:abc"
                .parse::<Checksum>()
                .unwrap_err()
                .contains("unknown checksum algorithm")
        );
        assert!(
            "sha256:abc"
                .parse::<Checksum>()
                .unwrap_err()
                .contains("64 hex digits")
        );
        assert!("xyz".parse::<Checksum>().is_err());
    }

    #[test]
    fn digests_match_known_values() {
        let mut h = Hasher::new(Algorithm::Md5);
        h.update(b"");
        assert_eq!(h.finish(), "d41d8cd98f00b204e9800998ecf8427e");
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(b"abc");
        assert_eq!(
            h.finish(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
