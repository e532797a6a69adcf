//! Who is calling: bearer tokens for the three roles, and the HMAC-signed user tokens.
//!
//! Admin and service tokens are compared in constant time (through their SHA-256 digests). A user token is
//! `skt1.<base64url(user_id)>.<expiry unix seconds>.<base64url(HMAC-SHA256(key, "skt1.<user>.<expiry>"))>`:
//! bound to one user, expiring, verifiable by any node holding the key, and never stored.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::access_log::CallerSlot;
use super::error::ApiError;
use crate::domain::Timestamp;

const USER_TOKEN_PREFIX: &str = "skt1";
/// The longest a user token may live (`ttl_seconds` at most this). A token whose expiry lies further
/// ahead was not minted by this service and is refused, however well signed.
pub const MAX_TOKEN_TTL_SECONDS: u64 = 30 * 86_400;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Service,
    User(String),
}

impl Caller {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            _ => Err(ApiError::forbidden("this endpoint is for the admin")),
        }
    }

    /// Admin or the operator's game backend.
    pub fn require_staff(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin | Caller::Service => Ok(()),
            Caller::User(_) => Err(ApiError::forbidden(
                "this endpoint is for the admin or the service",
            )),
        }
    }

    /// Admin, service, or the user `user_id` itself.
    pub fn require_user_access(&self, user_id: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin | Caller::Service => Ok(()),
            Caller::User(own) if own == user_id => Ok(()),
            Caller::User(_) => Err(ApiError::forbidden(
                "a user token gives access to its own user only",
            )),
        }
    }
}

/// The configured tokens and the user-token key.
pub struct Authenticator {
    admin: Option<[u8; 32]>,
    service: Option<[u8; 32]>,
    signer: TokenSigner,
}

impl Authenticator {
    pub fn new(
        admin_token: Option<&str>,
        service_token: Option<&str>,
        signer: TokenSigner,
    ) -> Authenticator {
        let digest = |t: &str| -> [u8; 32] { Sha256::digest(t.as_bytes()).into() };
        Authenticator {
            admin: admin_token.map(digest),
            service: service_token.map(digest),
            signer,
        }
    }

    pub fn signer(&self) -> &TokenSigner {
        &self.signer
    }

    /// The caller a bearer token stands for, if any.
    pub fn identify(&self, token: &str, now: Timestamp) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let matches =
            |expected: &Option<[u8; 32]>| expected.is_some_and(|e| bool::from(e.ct_eq(&digest)));
        if matches(&self.admin) {
            return Some(Caller::Admin);
        }
        if matches(&self.service) {
            return Some(Caller::Service);
        }
        self.signer.verify(token, now).map(Caller::User)
    }
}

pub struct TokenSigner {
    key: Vec<u8>,
}

impl TokenSigner {
    pub fn new(key: &[u8]) -> TokenSigner {
        TokenSigner { key: key.to_vec() }
    }

    fn mac(&self, payload: &str) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes keys of any length");
        mac.update(payload.as_bytes());
        mac
    }

    /// A token for `user_id` that expires at `expires_at` (whole seconds). Deterministic, so a replayed
    /// mint returns the very same token.
    pub fn mint(&self, user_id: &str, expires_at: Timestamp) -> String {
        let payload = format!(
            "{USER_TOKEN_PREFIX}.{}.{}",
            URL_SAFE_NO_PAD.encode(user_id),
            expires_at.unix_seconds()
        );
        let signature = URL_SAFE_NO_PAD.encode(self.mac(&payload).finalize().into_bytes());
        format!("{payload}.{signature}")
    }

    /// The user of a valid, unexpired token.
    pub fn verify(&self, token: &str, now: Timestamp) -> Option<String> {
        let (payload, signature) = token.rsplit_once('.')?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        self.mac(payload).verify_slice(&signature).ok()?;
        let mut parts = payload.split('.');
        let (prefix, user, expiry) = (parts.next()?, parts.next()?, parts.next()?);
        if prefix != USER_TOKEN_PREFIX || parts.next().is_some() {
            return None;
        }
        let expiry: i64 = expiry.parse().ok()?;
        if now.unix_seconds() >= expiry {
            return None;
        }
        if expiry.abs_diff(now.unix_seconds()) > MAX_TOKEN_TTL_SECONDS {
            return None;
        }
        String::from_utf8(URL_SAFE_NO_PAD.decode(user).ok()?).ok()
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(ApiError::unauthenticated)?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.split_once(' '))
            // The scheme is case-insensitive (RFC 9110 §11.1).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(ApiError::unauthenticated)?;
        let caller = state
            .auth
            .identify(token, Timestamp::now())
            .ok_or_else(ApiError::unauthenticated)?;
        if let Some(slot) = parts.extensions.get::<CallerSlot>() {
            slot.record(&caller);
        }
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_tokens_verify_until_they_expire_and_resist_tampering() {
        let signer = TokenSigner::new(b"key");
        let now = Timestamp::from_unix_seconds(1_000);
        let token = signer.mint("player-42", Timestamp::from_unix_seconds(2_000));
        assert_eq!(signer.verify(&token, now), Some("player-42".to_owned()));
        assert_eq!(
            signer.verify(&token, Timestamp::from_unix_seconds(2_000)),
            None
        );
        assert_eq!(TokenSigner::new(b"other").verify(&token, now), None);
        let forged = token.replace(
            &URL_SAFE_NO_PAD.encode("player-42"),
            &URL_SAFE_NO_PAD.encode("player-43"),
        );
        assert_eq!(signer.verify(&forged, now), None);
        assert_eq!(signer.verify("garbage", now), None);
    }

    #[test]
    fn a_well_signed_token_that_lives_longer_than_the_maximum_ttl_is_refused() {
        let signer = TokenSigner::new(b"key");
        let now = Timestamp::from_unix_seconds(1_000);
        let longest = 1_000 + i64::try_from(MAX_TOKEN_TTL_SECONDS).expect("fits");
        let at_limit = signer.mint("p", Timestamp::from_unix_seconds(longest));
        assert_eq!(signer.verify(&at_limit, now), Some("p".to_owned()));
        let beyond = signer.mint("p", Timestamp::from_unix_seconds(longest + 1));
        assert_eq!(signer.verify(&beyond, now), None);
    }

    #[test]
    fn roles_are_told_apart() {
        let auth = Authenticator::new(Some("a"), Some("s"), TokenSigner::new(b"k"));
        let now = Timestamp::from_unix_seconds(1);
        assert_eq!(auth.identify("a", now), Some(Caller::Admin));
        assert_eq!(auth.identify("s", now), Some(Caller::Service));
        assert_eq!(auth.identify("x", now), None);
        let no_service = Authenticator::new(Some("a"), None, TokenSigner::new(b"k"));
        assert_eq!(no_service.identify("", now), None);
    }
}
