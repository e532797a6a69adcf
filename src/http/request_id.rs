//! The `X-Request-Id` given to a request that came without one: a random (version 4) UUID.
//!
//! tower-http's `MakeRequestUuid` asks the kernel for the 16 random bytes of every id (a `getrandom`
//! system call per request, 0.7 % of one node's CPU at 256 clients: docs/BENCHMARKS.md, thirty-first
//! session). These come from `rand`'s thread-local generator instead (ChaCha, seeded from the kernel and
//! reseeded after every 64 KiB it gives: one system call per 4,096 ids). An id only has to be unique
//! enough to find a request in the logs; it guards nothing.

use axum::http::{HeaderValue, Request};
use tower_http::request_id::{MakeRequestId, RequestId};

/// Makes a version 4 UUID for each request without an `X-Request-Id`.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        let mut text = uuid::Uuid::encode_buffer();
        let header = HeaderValue::from_str(id.hyphenated().encode_lower(&mut text)).ok()?;
        Some(RequestId::new(header))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make() -> String {
        let request = Request::new(());
        let id = RandomRequestId.make_request_id(&request).expect("an id");
        id.header_value().to_str().expect("ascii").to_owned()
    }

    #[test]
    fn generated_ids_are_distinct_version_4_uuids() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| make()).collect();
        assert_eq!(ids.len(), 1000, "an id came twice");
        for id in &ids {
            let parsed = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(parsed.get_version_num(), 4, "{id}");
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
            assert_eq!(id.len(), 36, "{id}: hyphenated");
        }
    }
}
