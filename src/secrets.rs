//! Secrets: how strong a configured one must be, and the keys derived from them.
//!
//! One secret never serves two purposes: the cluster secret (or the token secret) is input keying
//! material for HKDF-SHA256 (RFC 5869), and each use takes its own 32-byte key under its own label, so
//! what one key signs (a node call, a user token) says nothing about another.

use hkdf::Hkdf;
use sha2::Sha256;

/// The shortest token or secret accepted from the configuration.
pub const MIN_SECRET_CHARS: usize = 32;
/// Text of the example files that must never reach production.
const PLACEHOLDER: &str = "change-me";
/// HKDF salt: fixes the derivation to this application and version.
const SALT: &[u8] = b"shopkeep/keys/v1";

/// What a derived key is for (its HKDF label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPurpose {
    /// Authenticates node-to-node calls (from the cluster secret).
    NodeAuth,
    /// Signs user tokens (from the token secret, or the cluster secret in a cluster).
    UserToken,
}

impl KeyPurpose {
    fn label(self) -> &'static [u8] {
        match self {
            KeyPurpose::NodeAuth => b"node-auth",
            KeyPurpose::UserToken => b"user-token",
        }
    }
}

/// The 32-byte key for `purpose` derived from `secret`.
pub fn derive_key(secret: &str, purpose: KeyPurpose) -> [u8; 32] {
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(SALT), secret.as_bytes())
        .expand(purpose.label(), &mut key)
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 output length"));
    key
}

/// Refuses a configured secret that is too short to resist guessing or is an example's placeholder.
pub fn check_strength(name: &str, value: &str) -> Result<(), String> {
    if value.chars().count() < MIN_SECRET_CHARS {
        return Err(format!(
            "{name} is shorter than {MIN_SECRET_CHARS} characters; use e.g. `openssl rand -hex 32`"
        ));
    }
    if value.to_ascii_lowercase().contains(PLACEHOLDER) {
        return Err(format!(
            "{name} still contains the placeholder `{PLACEHOLDER}`; use e.g. `openssl rand -hex 32`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_purpose_gets_its_own_key() {
        let secret = "a".repeat(40);
        let node = derive_key(&secret, KeyPurpose::NodeAuth);
        let token = derive_key(&secret, KeyPurpose::UserToken);
        assert_ne!(node, token);
        assert_eq!(node, derive_key(&secret, KeyPurpose::NodeAuth));
        assert_ne!(node, derive_key(&"b".repeat(40), KeyPurpose::NodeAuth));
    }

    #[test]
    fn short_and_placeholder_secrets_are_refused() {
        assert!(check_strength("S", "weak").is_err());
        assert!(check_strength("S", &"x".repeat(31)).is_err());
        assert!(check_strength("S", &"x".repeat(32)).is_ok());
        assert!(check_strength("S", "CHANGE-ME-this-is-long-enough-really-yes").is_err());
    }
}
