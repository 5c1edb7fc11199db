//! Tokens: the admin token guarding the cache management API, and the
//! optional token guarding image downloads. Clients send them as
//! `X-Auth-Token`, as python-glanceclient does.
//!
//! Both sides are hashed with SHA-256 before a constant-time comparison,
//! so neither the bytes nor the length of the configured token leak
//! through response timing.

use axum::http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, ServeError};

/// The header glanceclient sends.
pub const TOKEN_HEADER: &str = "x-auth-token";

/// A token the server accepts, kept only as its digest.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
}

impl Token {
    /// A token from its secret (surrounding whitespace trimmed): at least
    /// 16 characters. The error never repeats the secret.
    pub fn new(secret: &str) -> Result<Token, ServeError> {
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(ServeError::Config("the token is empty".into()));
        }
        if secret.len() < 16 {
            return Err(ServeError::Config(
                "the token is shorter than 16 characters".into(),
            ));
        }
        Ok(Token {
            digest: Sha256::digest(secret.as_bytes()).into(),
        })
    }

    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        self.digest.ct_eq(&digest).into()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<digest>)")
    }
}

/// A secret the server sends (the upstream token), never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Surrounding whitespace trimmed; `None` when nothing is left.
    pub fn new(text: &str) -> Option<Secret> {
        let t = text.trim();
        (!t.is_empty()).then(|| Secret(t.to_string()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Check the request's `X-Auth-Token` against any of `accepted`: 401
/// when none is sent or it matches none (as Glance behind
/// keystonemiddleware answers a missing or invalid token).
pub fn check(headers: &HeaderMap, accepted: &[&Token]) -> Result<(), ApiError> {
    let Some(value) = headers.get(TOKEN_HEADER) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this endpoint requires a token in the X-Auth-Token header",
        ));
    };
    let presented = value.as_bytes();
    // Check every token (no early exit) so timing does not tell which.
    let mut ok = false;
    for token in accepted {
        ok |= token.matches(presented);
    }
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the X-Auth-Token is not accepted for this endpoint",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked() {
        let t = Token::new("0123456789abcdef-secret").unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(
            check(&h, &[&t]).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        h.insert(TOKEN_HEADER, "0123456789abcdef-secreT".parse().unwrap());
        assert_eq!(
            check(&h, &[&t]).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        h.insert(TOKEN_HEADER, "0123456789abcdef-secret".parse().unwrap());
        assert!(check(&h, &[&t]).is_ok());
        assert!(Token::new("  ").is_err());
        assert!(Token::new("short").is_err());
    }
}
