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
pub enum KeyPurpose<'a> {
    /// Authenticates node-to-node calls (from the cluster secret).
    NodeAuth,
    /// Signs user tokens (from the token secret, or the cluster secret in a cluster).
    UserToken,
    /// Signs the events POSTed to the webhook `name` (from the cluster secret). Each `PUT` of the webhook
    /// bumps its `generation`, so a new secret replaces the old one without storing either: every
    /// replica derives the same key from the replicated name and generation.
    WebhookSecret { name: &'a str, generation: u64 },
}

/// The label prefix of webhook secrets; the generation (8 bytes, big-endian) and the name follow.
const WEBHOOK_SECRET_LABEL: &[u8] = b"webhook-secret/";

impl KeyPurpose<'_> {
    /// The HKDF `info` of the purpose. Distinct purposes never share one: the fixed labels differ,
    /// and a webhook's is its own prefix, then a fixed-width generation, then the name (last, so no
    /// two (name, generation) pairs give the same bytes).
    fn label(self) -> Vec<u8> {
        match self {
            KeyPurpose::NodeAuth => b"node-auth".to_vec(),
            KeyPurpose::UserToken => b"user-token".to_vec(),
            KeyPurpose::WebhookSecret { name, generation } => {
                let mut label = Vec::with_capacity(WEBHOOK_SECRET_LABEL.len() + 8 + name.len());
                label.extend_from_slice(WEBHOOK_SECRET_LABEL);
                label.extend_from_slice(&generation.to_be_bytes());
                label.extend_from_slice(name.as_bytes());
                label
            }
        }
    }
}

/// The 32-byte key for `purpose` derived from `secret`.
pub fn derive_key(secret: &str, purpose: KeyPurpose<'_>) -> [u8; 32] {
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(SALT), secret.as_bytes())
        .expand(&purpose.label(), &mut key)
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 output length"));
    key
}

/// The signing key of the webhook `name` at `generation`, derived from the cluster secret (the same on
/// every node, so any shard leader signs with it). `engine::webhooks::sign::webhook_secret` formats it.
pub fn webhook_key(cluster_secret: &str, name: &str, generation: u64) -> [u8; 32] {
    derive_key(
        cluster_secret,
        KeyPurpose::WebhookSecret { name, generation },
    )
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
    fn the_fixed_labels_are_unchanged() {
        // Existing clusters' node-auth and token keys must survive the enum growing a variant.
        let mut expected = [0u8; 32];
        Hkdf::<Sha256>::new(Some(SALT), b"s")
            .expand(b"node-auth", &mut expected)
            .unwrap();
        assert_eq!(derive_key("s", KeyPurpose::NodeAuth), expected);
    }

    #[test]
    fn each_webhook_and_generation_gets_its_own_key() {
        let secret = "c".repeat(40);
        let key = webhook_key(&secret, "game", 1);
        assert_eq!(key, webhook_key(&secret, "game", 1));
        assert_ne!(key, webhook_key(&secret, "game", 2));
        assert_ne!(key, webhook_key(&secret, "finance", 1));
        assert_ne!(key, webhook_key(&"d".repeat(40), "game", 1));
        assert_ne!(key, derive_key(&secret, KeyPurpose::NodeAuth));
        assert_ne!(key, derive_key(&secret, KeyPurpose::UserToken));
        // The name comes after a fixed-width generation: no (name, generation) pair aliases another.
        assert_ne!(webhook_key(&secret, "a", 0), webhook_key(&secret, "", 0));
        assert_ne!(webhook_key(&secret, "\0", 0), webhook_key(&secret, "", 0));
    }

    #[test]
    fn short_and_placeholder_secrets_are_refused() {
        assert!(check_strength("S", "weak").is_err());
        assert!(check_strength("S", &"x".repeat(31)).is_err());
        assert!(check_strength("S", &"x".repeat(32)).is_ok());
        assert!(check_strength("S", "CHANGE-ME-this-is-long-enough-really-yes").is_err());
    }
}
