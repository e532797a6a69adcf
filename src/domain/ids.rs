//! Identifiers: validation of client-chosen ids and deterministic derivation of server-made ones.
//!
//! Client ids (`user_id`, `item_id`) are 1–64 chars of `[A-Za-z0-9_.-]`. Server ids are UUIDv7. Because
//! `apply` must be deterministic, it never draws randomness: every command carries an [`IdSeed`] chosen
//! before proposing, and `apply` derives as many UUIDv7s as it needs from it, the same on every replica.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The longest client-chosen identifier.
pub const MAX_ID_LEN: usize = 64;

/// `true` if `id` is a valid client-chosen identifier (1–64 chars of `[A-Za-z0-9_.-]`).
pub fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The randomness of one command, fixed before it is proposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdSeed {
    /// Milliseconds since the Unix epoch: the timestamp part of every UUIDv7 derived from this seed.
    pub unix_millis: u64,
    /// Random bits drawn by the proposer.
    pub entropy: u128,
}

impl IdSeed {
    /// The `n`th UUIDv7 of this command. Distinct `n` give distinct ids; the same seed and `n` always give
    /// the same id.
    pub fn derive(&self, n: u32) -> Uuid {
        let mut input = [0u8; 20];
        input[..16].copy_from_slice(&self.entropy.to_le_bytes());
        input[16..].copy_from_slice(&n.to_le_bytes());
        let digest = xxhash_rust::xxh3::xxh3_128(&input).to_le_bytes();
        let mut random = [0u8; 10];
        random.copy_from_slice(&digest[..10]);
        uuid::Builder::from_unix_timestamp_millis(self.unix_millis, &random).into_uuid()
    }
}

/// Where the seed's event ids start (a command draws a handful of secondary ids, never 2³¹).
const EVENT_IDS: u32 = 1 << 31;

/// Hands out the secondary ids of one command (ledger entries) in order. Id 0 of a seed is reserved for
/// the command's main id (the order, credit, top-up, refund or generated user id), so that main id never
/// depends on how many secondary ids were drawn before it.
#[derive(Debug)]
pub struct IdSequence {
    seed: IdSeed,
    next: u32,
}

impl IdSequence {
    pub fn new(seed: IdSeed) -> IdSequence {
        IdSequence { seed, next: 1 }
    }

    pub fn primary(&self) -> Uuid {
        self.seed.derive(0)
    }

    /// The id of the command's `n`th event: from a range of the seed apart from the main and secondary
    /// ids, so that emitting events changes no other id a command derives.
    pub fn event_id(&self, n: u32) -> Uuid {
        self.seed.derive(EVENT_IDS.saturating_add(n))
    }

    pub fn next_id(&mut self) -> Uuid {
        let id = self.seed.derive(self.next);
        self.next += 1;
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_client_ids() {
        assert!(is_valid_id("player-42"));
        assert!(is_valid_id("a.b_c-D9"));
        assert!(is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("é"));
    }

    #[test]
    fn derived_ids_are_uuid_v7_deterministic_and_distinct() {
        let seed = IdSeed {
            unix_millis: 1_700_000_000_000,
            entropy: 42,
        };
        let a = seed.derive(0);
        assert_eq!(a.get_version_num(), 7);
        assert_eq!(a, seed.derive(0));
        assert_ne!(a, seed.derive(1));
        let mut seq = IdSequence::new(seed);
        assert_eq!(seq.primary(), a);
        assert_eq!(seq.next_id(), seed.derive(1));
        assert_eq!(seq.next_id(), seed.derive(2));
    }
}
