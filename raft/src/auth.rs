//! Authentication of node-to-node calls: a per-request MAC instead of the cluster secret on the wire.
//!
//! The caller sends one header, [`AUTH_HEADER`]:
//!
//! ```text
//! v1,<sender node id>,<unix microseconds>,<nonce: 32 hex>,<SHA-256 of the body: 64 hex>,<HMAC-SHA256: 64 hex>
//! ```
//!
//! The MAC covers the sender, the method, the path, the timestamp, the nonce and the body's digest, under a key the
//! application derives from the cluster secret for this purpose only. The receiver checks all of it from
//! the headers alone, *before* it reads a byte of the body, so a stranger costs it one HMAC over ~150
//! bytes and no memory: the timestamp must be within [`REPLAY_WINDOW`] of the receiver's clock, the MAC
//! must match, and the nonce must not have been seen within the window (a bounded [`ReplayGuard`]). Only
//! then is the body read, and its digest must equal the signed one.
//!
//! A captured request is useless elsewhere (path and method are signed), later (the window) and again
//! (the nonce), and it never reveals the secret or the user-token key derived from the same secret.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::{Reading, unix_micros};

/// The header that carries a node call's authentication.
pub const AUTH_HEADER: &str = "x-shopkeep-node-auth";
/// How far a call's timestamp may be from the receiver's clock. Members' clocks must agree within it.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(60);
/// Most nonces remembered at once (~40 bytes each): more calls than this inside one window (over 17,000
/// a second, sustained) are refused until old ones leave it. Only authenticated members can fill it.
pub const MAX_REMEMBERED_NONCES: usize = 1 << 20;
/// The longest header accepted; a valid one is under 200 bytes.
const MAX_HEADER_BYTES: usize = 256;
const VERSION: &str = "v1";

/// Why a node call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeAuthError {
    #[error("missing {AUTH_HEADER} header")]
    Missing,
    #[error("malformed {AUTH_HEADER} header")]
    Malformed,
    #[error("node {sender}'s clock is {offset_seconds} s away from this node's (allowed: {window} s); check NTP", window = REPLAY_WINDOW.as_secs())]
    Stale { sender: u64, offset_seconds: u64 },
    #[error("signature does not match")]
    BadSignature,
    #[error("replayed call")]
    Replayed,
    #[error("too many calls inside the replay window")]
    Saturated,
    #[error("the body does not match its signed digest")]
    BodyMismatch,
}

/// An authenticated call, from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The member that signed it.
    pub sender: u64,
    /// The sender's clock minus this node's when the call arrived, in microseconds (latency included).
    pub offset_micros: i64,
    /// This node's clock reading `offset_micros` was measured against.
    pub at: Reading,
    pub body: SignedBody,
}

/// What the headers of an authenticated call promise about its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedBody {
    digest: [u8; 32],
}

impl SignedBody {
    /// Checks the body, once read, against the digest the caller signed.
    pub fn check(&self, body: &[u8]) -> Result<(), NodeAuthError> {
        let digest: [u8; 32] = Sha256::digest(body).into();
        if bool::from(digest.ct_eq(&self.digest)) {
            Ok(())
        } else {
            Err(NodeAuthError::BodyMismatch)
        }
    }
}

/// Signs and verifies node calls with one 32-byte key.
pub struct NodeAuth {
    key: [u8; 32],
    /// This node's id, signed into its calls.
    node_id: u64,
    seen: Mutex<ReplayGuard>,
}

impl std::fmt::Debug for NodeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeAuth(<key>)")
    }
}

impl NodeAuth {
    pub fn new(key: [u8; 32], node_id: u64) -> NodeAuth {
        NodeAuth {
            key,
            node_id,
            seen: Mutex::new(ReplayGuard::default()),
        }
    }

    fn mac(&self, signed: &[&str]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes any key length");
        for part in signed {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac
    }

    /// The header value that authenticates `method path` with `body`, now.
    pub fn sign(&self, method: &str, path: &str, body: &[u8]) -> String {
        self.sign_at(
            method,
            path,
            body,
            unix_micros(),
            rand::random::<[u8; 16]>(),
        )
    }

    fn sign_at(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        timestamp: i64,
        nonce: [u8; 16],
    ) -> String {
        let sender = self.node_id.to_string();
        let timestamp = timestamp.to_string();
        let nonce = hex::encode(nonce);
        let digest = hex::encode(Sha256::digest(body));
        let signed = [VERSION, &sender, method, path, &timestamp, &nonce, &digest];
        let tag = hex::encode(self.mac(&signed).finalize().into_bytes());
        format!("{VERSION},{sender},{timestamp},{nonce},{digest},{tag}")
    }

    /// The key of the node stream opened by the upgrade that `auth_header` signed (see `crate::stream`).
    pub fn stream_key(&self, auth_header: &[u8]) -> crate::stream::StreamKey {
        crate::stream::StreamKey::derive(&self.key, auth_header)
    }

    /// Checks a call from its headers alone; the body is checked later with [`Verified::body`].
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        header: Option<&[u8]>,
    ) -> Result<Verified, NodeAuthError> {
        self.verify_at(method, path, header, Reading::now())
    }

    fn verify_at(
        &self,
        method: &str,
        path: &str,
        header: Option<&[u8]>,
        at: Reading,
    ) -> Result<Verified, NodeAuthError> {
        let now = at.unix_micros;
        let header = header.ok_or(NodeAuthError::Missing)?;
        if header.len() > MAX_HEADER_BYTES {
            return Err(NodeAuthError::Malformed);
        }
        let header = std::str::from_utf8(header).map_err(|_| NodeAuthError::Malformed)?;
        let parts: Vec<&str> = header.split(',').collect();
        let [version, sender_text, timestamp_text, nonce, digest, tag] = parts[..] else {
            return Err(NodeAuthError::Malformed);
        };
        let sender: u64 = sender_text.parse().map_err(|_| NodeAuthError::Malformed)?;
        let timestamp: i64 = timestamp_text
            .parse()
            .map_err(|_| NodeAuthError::Malformed)?;
        let nonce_bytes = decode_hex::<16>(nonce)?;
        let digest_bytes = decode_hex::<32>(digest)?;
        let tag = decode_hex::<32>(tag)?;
        if version != VERSION {
            return Err(NodeAuthError::Malformed);
        }
        // The MAC first: a stale call's sender and offset are then known to be true (and worth a log).
        self.mac(&[
            version,
            sender_text,
            method,
            path,
            timestamp_text,
            nonce,
            digest,
        ])
        .verify_slice(&tag)
        .map_err(|_| NodeAuthError::BadSignature)?;
        let offset_micros = timestamp.saturating_sub(now);
        check_window(sender, offset_micros)?;
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .admit(nonce_bytes, timestamp, now)?;
        Ok(Verified {
            sender,
            offset_micros,
            at,
            body: SignedBody {
                digest: digest_bytes,
            },
        })
    }
}

/// Refuses a call from `sender` whose clock is `offset_micros` away from this node's by more than
/// [`REPLAY_WINDOW`] (a node call's timestamp, or a stream frame's time).
pub fn check_window(sender: u64, offset_micros: i64) -> Result<(), NodeAuthError> {
    if offset_micros.unsigned_abs() > window_micros() {
        return Err(NodeAuthError::Stale {
            sender,
            offset_seconds: offset_micros.unsigned_abs() / 1_000_000,
        });
    }
    Ok(())
}

fn window_micros() -> u64 {
    u64::try_from(REPLAY_WINDOW.as_micros()).unwrap_or(u64::MAX)
}

fn decode_hex<const N: usize>(text: &str) -> Result<[u8; N], NodeAuthError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).map_err(|_| NodeAuthError::Malformed)?;
    Ok(out)
}

/// The nonces of the calls accepted within the replay window, oldest first; bounded.
#[derive(Default)]
struct ReplayGuard {
    /// (nonce key, timestamp in unix microseconds) in order of arrival.
    order: VecDeque<(u64, i64)>,
    nonces: HashSet<u64>,
}

/// A nonce as the guard keeps it: its first 8 bytes (random, so as unique as the whole for this use).
fn nonce_key(nonce: [u8; 16]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&nonce[..8]);
    u64::from_le_bytes(first)
}

impl ReplayGuard {
    /// Accepts `nonce` (signed at `timestamp`) once. Nonces leave once their timestamp is out of the
    /// window: a replay of them is refused as stale from then on.
    fn admit(&mut self, nonce: [u8; 16], timestamp: i64, now: i64) -> Result<(), NodeAuthError> {
        let window = window_micros();
        // Forget nonces whose timestamp has left the window: a replay of them is refused as stale.
        while let Some(&(old, at)) = self.order.front() {
            if now.abs_diff(at) <= window {
                break;
            }
            self.order.pop_front();
            self.nonces.remove(&old);
        }
        if self.order.len() >= MAX_REMEMBERED_NONCES {
            return Err(NodeAuthError::Saturated);
        }
        let key = nonce_key(nonce);
        if !self.nonces.insert(key) {
            return Err(NodeAuthError::Replayed);
        }
        self.order.push_back((key, timestamp));
        debug_assert_eq!(self.order.len(), self.nonces.len());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000_000;
    const SECOND: i64 = 1_000_000;

    fn auth() -> NodeAuth {
        NodeAuth::new([7; 32], 4)
    }

    #[test]
    fn a_signed_call_verifies_once_and_its_body_is_bound() {
        let auth = auth();
        let header = auth.sign_at("POST", "/_node/v1/call", b"body", NOW, [1; 16]);
        let verified = auth
            .verify_at(
                "POST",
                "/_node/v1/call",
                Some(header.as_bytes()),
                Reading::at(NOW + SECOND),
            )
            .expect("valid");
        assert_eq!((verified.sender, verified.offset_micros), (4, -SECOND));
        assert_eq!(verified.body.check(b"body"), Ok(()));
        assert_eq!(
            verified.body.check(b"bodY"),
            Err(NodeAuthError::BodyMismatch)
        );
        assert_eq!(
            auth.verify_at(
                "POST",
                "/_node/v1/call",
                Some(header.as_bytes()),
                Reading::at(NOW + SECOND)
            ),
            Err(NodeAuthError::Replayed)
        );
    }

    #[test]
    fn calls_signed_for_another_path_key_or_time_are_refused() {
        let auth = auth();
        let header = auth.sign_at("POST", "/_node/v1/call", b"", NOW, [2; 16]);
        assert_eq!(
            auth.verify_at(
                "POST",
                "/_node/v1/other",
                Some(header.as_bytes()),
                Reading::at(NOW)
            ),
            Err(NodeAuthError::BadSignature)
        );
        assert_eq!(
            NodeAuth::new([8; 32], 4).verify_at(
                "POST",
                "/_node/v1/call",
                Some(header.as_bytes()),
                Reading::at(NOW)
            ),
            Err(NodeAuthError::BadSignature)
        );
        assert_eq!(
            auth.verify_at(
                "POST",
                "/_node/v1/call",
                Some(header.as_bytes()),
                Reading::at(NOW + 61 * SECOND)
            ),
            Err(NodeAuthError::Stale {
                sender: 4,
                offset_seconds: 61
            })
        );
        assert_eq!(
            auth.verify_at("POST", "/_node/v1/call", None, Reading::at(NOW)),
            Err(NodeAuthError::Missing)
        );
        let long = "v1,".repeat(100);
        assert_eq!(
            auth.verify_at(
                "POST",
                "/_node/v1/call",
                Some(long.as_bytes()),
                Reading::at(NOW)
            ),
            Err(NodeAuthError::Malformed)
        );
    }

    #[test]
    fn the_replay_guard_forgets_nonces_once_out_of_the_window() {
        let mut guard = ReplayGuard::default();
        assert_eq!(guard.admit([1; 16], NOW, NOW), Ok(()));
        assert_eq!(
            guard.admit([1; 16], NOW, NOW + SECOND),
            Err(NodeAuthError::Replayed)
        );
        assert_eq!(
            guard.admit([2; 16], NOW + 100 * SECOND, NOW + 100 * SECOND),
            Ok(())
        );
        assert_eq!(guard.order.len(), 1, "the first nonce left with its window");
    }
}
