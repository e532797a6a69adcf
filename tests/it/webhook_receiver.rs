//! A real HTTP endpoint for webhook tests: the game server's side of `PUT /v1/webhooks/{name}`.
//!
//! [`WebhookReceiver::start`] serves HTTP/1.1 on 127.0.0.1 (a free port) from the test's tokio runtime
//! and records every request: headers, body, arrival time, and whether its Standard Webhooks signature
//! verifies (with the `standardwebhooks` crate) under the secret it was given. It answers 200, or on
//! purpose fails ([`Mode`]) until told to recover, to drive the server's retries.
//!
//! The server under test runs in its own process, so it reaches the receiver over TCP like a real
//! endpoint; the test's runtime must keep running while it waits (await, don't block: use
//! `wait_for`, or a multi-thread runtime when the test blocks).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use reqwest::header::HeaderMap;
use serde_json::Value;
use standardwebhooks::Webhook;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// How long [`Mode::Hang`] holds a request: beyond the server's 10 s per attempt.
pub const HANG: Duration = Duration::from_secs(15);
/// The largest body recorded (larger ones are cut).
const MAX_BODY: usize = 1 << 20;

/// How the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 200 (the default).
    Ok,
    /// This status (e.g. 500).
    Status(u16),
    /// Nothing for [`HANG`], then 200 (too late to count).
    Hang,
    /// Closes the connection without an answer.
    Close,
}

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: HeaderMap,
    /// The body as JSON (`Value::Null` if it is not JSON; `raw` has the bytes).
    pub body: Value,
    pub raw: Vec<u8>,
    pub at: Instant,
    /// With a secret set: whether `standardwebhooks::Webhook::verify` accepts it (its timestamp within
    /// 5 minutes of this machine's clock included). `None` without a secret.
    pub verified: Option<bool>,
    /// With a secret set: whether the signature is the right HMAC of the id, timestamp and body,
    /// whatever the timestamp (for tests that move the server's clock). `None` without a secret.
    pub signature_matches: Option<bool>,
    /// How the receiver answered it.
    pub answered: Mode,
}

impl Received {
    /// A header's value as text (`None` if absent or not text).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `webhook-id` header (the event's id).
    pub fn event_id(&self) -> Option<&str> {
        self.header("webhook-id")
    }
}

struct Shared {
    secret: Mutex<Option<String>>,
    mode: Mutex<Mode>,
    /// Requests still to fail before the mode returns to `Ok` (`None`: until `recover`).
    failures_left: Mutex<Option<u32>>,
    received: Mutex<Vec<Received>>,
    arrived: Notify,
}

/// A running receiver; it stops when dropped.
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl WebhookReceiver {
    /// Starts a receiver on 127.0.0.1 (a free port), verifying signatures under `secret`
    /// (`whsec_…`) if given.
    pub async fn start(secret: Option<String>) -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            secret: Mutex::new(secret),
            mode: Mutex::new(Mode::Ok),
            failures_left: Mutex::new(None),
            received: Mutex::new(Vec::new()),
            arrived: Notify::new(),
        });
        let server = tokio::spawn(serve(listener, Arc::clone(&shared)));
        WebhookReceiver {
            addr,
            shared,
            server,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path>` (`path` starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Verifies the requests that arrive from now on under `secret` (e.g. once the `PUT` has shown it).
    pub fn set_secret(&self, secret: Option<String>) {
        *self.shared.secret.lock().unwrap() = secret;
    }

    /// Fails every request this way until [`Self::recover`].
    pub fn fail_with(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
        *self.shared.failures_left.lock().unwrap() = None;
    }

    /// Fails the next `n` requests this way, then answers 200 again.
    pub fn fail_next(&self, n: u32, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
        *self.shared.failures_left.lock().unwrap() = Some(n);
    }

    /// Answers 200 again.
    pub fn recover(&self) {
        self.fail_with(Mode::Ok);
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// The requests so far once there are at least `n`; panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before looking, so an arrival in between is not missed.
            let arrived = self.shared.arrived.notified();
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!(
                    "the webhook receiver got {} requests in {timeout:?}, not {n}: {:?}",
                    received.len(),
                    received
                        .iter()
                        .map(|r| (r.event_id(), r.answered))
                        .collect::<Vec<_>>()
                );
            }
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // Dropped with the task (on abort): every connection ends with the receiver.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            let service = service_fn(move |request| handle(request, Arc::clone(&shared)));
            // An error is a connection closed on purpose (Mode::Close) or by the client.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// Why a connection is closed without an answer.
#[derive(Debug)]
struct CloseOnPurpose;

impl std::fmt::Display for CloseOnPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closed on purpose")
    }
}

impl std::error::Error for CloseOnPurpose {}

async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Body>, CloseOnPurpose> {
    let at = Instant::now();
    let (parts, body) = request.into_parts();
    let raw = axum::body::to_bytes(Body::new(body), MAX_BODY)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    let secret = shared.secret.lock().unwrap().clone();
    let (verified, signature_matches) = match secret {
        None => (None, None),
        Some(secret) => {
            let (verified, matches) = check_signature(&secret, &parts.headers, &raw);
            (Some(verified), Some(matches))
        }
    };
    let answered = {
        let mut mode = shared.mode.lock().unwrap();
        let mut left = shared.failures_left.lock().unwrap();
        let answered = *mode;
        if let Some(n) = left.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                *mode = Mode::Ok;
                *left = None;
            }
        }
        answered
    };
    shared.received.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.to_string()),
        headers: parts.headers,
        body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
        raw,
        at,
        verified,
        signature_matches,
        answered,
    });
    shared.arrived.notify_waiters();
    let status = match answered {
        Mode::Ok => StatusCode::OK,
        Mode::Status(code) => StatusCode::from_u16(code).unwrap(),
        Mode::Hang => {
            tokio::time::sleep(HANG).await;
            StatusCode::OK
        }
        Mode::Close => return Err(CloseOnPurpose),
    };
    Ok(Response::builder()
        .status(status)
        .body(Body::from("ok"))
        .unwrap())
}

/// (the crate's `verify`, the HMAC without the timestamp's window).
fn check_signature(secret: &str, headers: &HeaderMap, body: &[u8]) -> (bool, bool) {
    let Ok(webhook) = Webhook::new(secret) else {
        return (false, false);
    };
    let verified = webhook.verify(body, headers).is_ok();
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let matches = match (
        header("webhook-id"),
        header("webhook-timestamp").and_then(|t| t.parse::<i64>().ok()),
        header("webhook-signature"),
    ) {
        (Some(id), Some(timestamp), Some(signatures)) => webhook
            .sign(id, timestamp, body)
            .is_ok_and(|expected| signatures.split(' ').any(|given| given == expected)),
        _ => false,
    };
    (verified, matches)
}

/// The receiver itself: records, verifies, and fails on purpose (no shopkeep server involved, but
/// the library's own signing and delivery attempt talk to it, as the server will).
#[tokio::test]
async fn the_receiver_records_verifies_and_fails_on_purpose() {
    use shopkeep::engine::webhooks::deliver::{Deliverer, DeliveryError};
    use shopkeep::engine::webhooks::sign::{sign_headers, webhook_secret};

    let secret = webhook_secret([9u8; 32]);
    let receiver = WebhookReceiver::start(Some(secret.clone())).await;
    let addrs = [receiver.addr()];
    let url = receiver.url("/shop-events?x=1");
    let deliverer = Deliverer::with_timeouts(Duration::from_secs(2), Duration::from_millis(500));
    let (deliverer, secret_ref, url_ref) = (&deliverer, &secret, &url);
    let post = move |id: &'static str, body: &'static str| async move {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let headers = sign_headers(secret_ref, id, now, body.as_bytes()).unwrap();
        deliverer
            .post(url_ref, &addrs, &headers, body.as_bytes().to_vec())
            .await
    };

    post("evt_1", r#"{"event_id":"evt_1","seq":1}"#)
        .await
        .unwrap();
    let got = receiver.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].path, "/shop-events?x=1");
    assert_eq!(got[0].event_id(), Some("evt_1"));
    assert_eq!(got[0].body["seq"], 1);
    assert_eq!(got[0].raw, br#"{"event_id":"evt_1","seq":1}"#);
    assert_eq!(got[0].header("content-type"), Some("application/json"));
    assert_eq!(got[0].verified, Some(true));
    assert_eq!(got[0].signature_matches, Some(true));
    assert_eq!(got[0].answered, Mode::Ok);

    // A plain client with a forged signature is recorded as not verified.
    let forged = reqwest::Client::new()
        .post(&url)
        .header("webhook-id", "evt_2")
        .header("webhook-timestamp", "1700000000")
        .header("webhook-signature", "v1,AAAA")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 200);
    let got = receiver.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(got[1].verified, Some(false));
    assert_eq!(got[1].signature_matches, Some(false));

    // Failing on purpose, then recovering.
    receiver.fail_with(Mode::Status(500));
    let body = r#"{"event_id":"evt_3"}"#;
    assert_eq!(post("evt_3", body).await, Err(DeliveryError::Status(500)));
    assert_eq!(post("evt_3", body).await, Err(DeliveryError::Status(500)));
    receiver.fail_with(Mode::Close);
    assert_eq!(post("evt_3", body).await, Err(DeliveryError::Closed));
    receiver.fail_with(Mode::Hang);
    assert_eq!(
        post("evt_3", body).await,
        Err(DeliveryError::TimedOut(Duration::from_millis(500)))
    );
    receiver.recover();
    post("evt_3", body).await.unwrap();
    receiver.fail_next(1, Mode::Status(503));
    assert_eq!(post("evt_4", body).await, Err(DeliveryError::Status(503)));
    post("evt_4", body).await.unwrap();

    let got = receiver.wait_for(9, Duration::from_secs(5)).await;
    let answered: Vec<Mode> = got.iter().map(|r| r.answered).collect();
    assert_eq!(
        answered,
        [
            Mode::Ok,
            Mode::Ok,
            Mode::Status(500),
            Mode::Status(500),
            Mode::Close,
            Mode::Hang,
            Mode::Ok,
            Mode::Status(503),
            Mode::Ok
        ]
    );
    assert!(got.iter().skip(2).all(|r| r.verified == Some(true)));
    assert!(got.windows(2).all(|w| w[0].at <= w[1].at));

    // Without a secret nothing is judged.
    receiver.set_secret(None);
    post("evt_5", body).await.unwrap();
    let got = receiver.wait_for(10, Duration::from_secs(5)).await;
    assert_eq!(got[9].verified, None);
}
