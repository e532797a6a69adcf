//! Signing the events POSTed to webhooks, per Standard Webhooks (<https://www.standardwebhooks.com>).
//!
//! A webhook's secret is `whsec_` and the base64 of 32 bytes (`secrets::webhook_key`, derived from the
//! cluster secret, the webhook's name and its generation). Each request carries `webhook-id` (the
//! event's id), `webhook-timestamp` (Unix seconds of the attempt) and `webhook-signature`:
//! `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`. The HMAC is the `standardwebhooks`
//! reference crate's, so what we send is what receivers using any Standard Webhooks library verify.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::header::{HeaderName, HeaderValue};
use standardwebhooks::Webhook;

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";
pub const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
pub const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
pub const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// Why a request could not be signed (a bug of the caller, never of the receiver).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("the webhook secret is not whsec_<base64>")]
    BadSecret,
    #[error("the event id is not a valid header value")]
    BadEventId,
    #[error("the body is not UTF-8")]
    BodyNotUtf8,
}

/// The Standard Webhooks secret of a 32-byte key: `whsec_<base64>`, as the `PUT` shows it once.
pub fn webhook_secret(key: [u8; 32]) -> String {
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// The three Standard Webhooks headers of one POST of `body` (the event's JSON) for the event
/// `event_id`, signed at `timestamp` (Unix seconds) with `secret` (`whsec_<base64>`). Every value is a
/// valid header value.
pub fn sign_headers(
    secret: &str,
    event_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<[(HeaderName, String); 3], SignError> {
    let base64_key = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or(SignError::BadSecret)?;
    if base64_key.is_empty() {
        return Err(SignError::BadSecret);
    }
    let webhook = Webhook::new(secret).map_err(|_| SignError::BadSecret)?;
    // The id is part of the signed text: refuse what a receiver would read back differently.
    if event_id.is_empty() || HeaderValue::from_str(event_id).is_err() {
        return Err(SignError::BadEventId);
    }
    if std::str::from_utf8(body).is_err() {
        return Err(SignError::BodyNotUtf8);
    }
    let signature = webhook
        .sign(event_id, timestamp, body)
        .map_err(|_| SignError::BodyNotUtf8)?;
    Ok([
        (WEBHOOK_ID, event_id.to_owned()),
        (WEBHOOK_TIMESTAMP, timestamp.to_string()),
        (WEBHOOK_SIGNATURE, signature),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, KeyInit, Mac};
    use reqwest::header::HeaderMap;
    use sha2::Sha256;

    fn header_map(headers: &[(HeaderName, String); 3]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn the_secret_is_whsec_and_base64_of_the_key() {
        let secret = webhook_secret([7u8; 32]);
        assert!(secret.starts_with("whsec_"));
        assert_eq!(STANDARD.decode(&secret[6..]).unwrap(), [7u8; 32]);
        assert_eq!(secret.len(), 6 + 44);
    }

    #[test]
    fn the_reference_library_verifies_what_we_sign() {
        let secret = webhook_secret(crate::secrets::webhook_key(&"k".repeat(40), "game", 1));
        let body = br#"{"event_id":"evt_1","type":"order.completed"}"#;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let headers = sign_headers(&secret, "evt_1", now, body).unwrap();
        assert_eq!(headers[0], (WEBHOOK_ID, "evt_1".to_owned()));
        assert_eq!(headers[1], (WEBHOOK_TIMESTAMP, now.to_string()));
        assert!(headers[2].1.starts_with("v1,"));
        let map = header_map(&headers);
        let verifier = Webhook::new(&secret).unwrap();
        verifier.verify(body, &map).unwrap();

        let changed = br#"{"event_id":"evt_1","type":"order.cancelled"}"#;
        assert!(verifier.verify(changed, &map).is_err());
        let other_key = Webhook::new(&webhook_secret([1u8; 32])).unwrap();
        assert!(other_key.verify(body, &map).is_err());
        let other_generation =
            webhook_secret(crate::secrets::webhook_key(&"k".repeat(40), "game", 2));
        assert!(
            Webhook::new(&other_generation)
                .unwrap()
                .verify(body, &map)
                .is_err()
        );
    }

    #[test]
    fn a_pinned_vector_computed_independently() {
        let key: [u8; 32] = core::array::from_fn(|i| u8::try_from(i).unwrap());
        let secret = webhook_secret(key);
        let body = br#"{"n":1}"#;
        let headers = sign_headers(&secret, "evt_0192", 1_700_000_000, body).unwrap();

        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(b"evt_0192.1700000000.{\"n\":1}");
        let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        assert_eq!(headers[2].1, expected);
        // Pinned, so a change of library or encoding shows here.
        assert_eq!(headers[2].1, PINNED);
    }

    // Computed with Python: hmac.new(bytes(range(32)), b'evt_0192.1700000000.{"n":1}', sha256).
    const PINNED: &str = "v1,2bPGXSEtv9JMT7JShzIxmxSfH4zNcP0p3feaomu4mRM=";

    #[test]
    fn bad_input_is_refused() {
        let secret = webhook_secret([0u8; 32]);
        assert_eq!(
            sign_headers("not-a-secret", "evt", 1, b"{}").unwrap_err(),
            SignError::BadSecret
        );
        assert_eq!(
            sign_headers("whsec_", "evt", 1, b"{}").unwrap_err(),
            SignError::BadSecret
        );
        assert_eq!(
            sign_headers("whsec_!!!", "evt", 1, b"{}").unwrap_err(),
            SignError::BadSecret
        );
        assert_eq!(
            sign_headers(&secret, "evt\n1", 1, b"{}").unwrap_err(),
            SignError::BadEventId
        );
        assert_eq!(
            sign_headers(&secret, "", 1, b"{}").unwrap_err(),
            SignError::BadEventId
        );
        assert_eq!(
            sign_headers(&secret, "evt", 1, &[0xff, 0xfe]).unwrap_err(),
            SignError::BodyNotUtf8
        );
    }
}
