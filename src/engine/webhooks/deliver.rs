//! One delivery attempt: POST one event to a webhook's URL, connecting only to the addresses
//! `allow.rs` checked, and tell acknowledged (2xx) from everything else.
//!
//! **Pinning the addresses.** The URL's host was resolved and judged by
//! [`AllowHosts::resolve_checked`](super::allow::AllowHosts::resolve_checked); a second resolution at
//! connect time could answer otherwise (DNS rebinding) and reach what the allow-list refuses. So the
//! request is sent by a `reqwest::Client` built for that host with `resolve_to_addrs(host, checked)`,
//! whose DNS resolver refuses every other name: the connection can only go to a checked address, and
//! the request still carries the URL's own `Host` header. Clients are cached by host together with the
//! addresses they were built for (rebuilt when the checked addresses change, the cache emptied past
//! [`MAX_CACHED_CLIENTS`] hosts), so keep-alive connections are reused between events. Rejected: one
//! shared client with a resolver reading a shared host → addresses map (two concurrent attempts for one
//! host with different answers would race), and rewriting the URL to an IP address with a `Host`
//! header (we would have to try each address ourselves, as hyper's connector already does).
//!
//! No redirects are followed (a 3xx is a failed attempt: a redirect could point anywhere), no proxy is
//! used (`HTTP_PROXY` must not carry events elsewhere), no retry inside an attempt (the outbox
//! schedules retries, `backoff.rs`). The attempt ends within [`TOTAL_TIMEOUT`] (the API's "a 2xx within
//! 10 s"); at most [`MAX_ANSWER_BYTES`] of the answer's body are read, then it is dropped.

use std::collections::HashMap;
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use reqwest::dns::{Name, Resolve, Resolving};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};
use url::Host;

use super::allow::{WebhookTargetError, check_url_shape};

/// Longest a connection may take to be established.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one attempt may take, from connecting to the answer's status (and its first 4 KiB).
pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of an answer's body read (and thrown away).
pub const MAX_ANSWER_BYTES: usize = 4096;
/// Most hosts whose clients are kept.
pub const MAX_CACHED_CLIENTS: usize = 64;

/// Why an attempt was not acknowledged. `Display` is short (under 100 characters), holds nothing the
/// receiver chose but a status code, and may be stored as the webhook's last error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("HTTP {0}")]
    Status(u16),
    #[error("timed out after {}", seconds(*.0))]
    TimedOut(Duration),
    #[error("could not connect within {}", seconds(*.0))]
    ConnectTimedOut(Duration),
    #[error("connection refused")]
    Refused,
    #[error("could not connect")]
    Connect,
    #[error("connection closed before the answer")]
    Closed,
    #[error("request failed")]
    Failed,
    #[error("no checked address to connect to")]
    NoAddress,
    #[error("{0}")]
    BadUrl(WebhookTargetError),
    #[error("a header value is invalid")]
    BadHeader,
    #[error("could not set up the HTTP client")]
    Client,
}

fn seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

/// Sends delivery attempts (one per event); shared by every shard's delivery loop.
pub struct Deliverer {
    connect_timeout: Duration,
    timeout: Duration,
    /// Host (lowercase, as the URL has it) → the addresses its client connects to, and the client.
    clients: Mutex<HashMap<String, (Vec<SocketAddr>, reqwest::Client)>>,
}

impl Default for Deliverer {
    fn default() -> Deliverer {
        Deliverer::new()
    }
}

impl Deliverer {
    /// With the API's timeouts ([`CONNECT_TIMEOUT`], [`TOTAL_TIMEOUT`]).
    pub fn new() -> Deliverer {
        Deliverer::with_timeouts(CONNECT_TIMEOUT, TOTAL_TIMEOUT)
    }

    /// With other timeouts (tests).
    pub fn with_timeouts(connect_timeout: Duration, timeout: Duration) -> Deliverer {
        Deliverer {
            connect_timeout,
            timeout,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// One attempt: POSTs `body` (JSON) with `headers` (`sign::sign_headers`) to `url`, connecting only
    /// to `addrs` (what `AllowHosts::resolve_checked` returned for `url`). `Ok` means a 2xx status.
    /// Only the addresses' IPs are used: the port is always the URL's (as `resolve_checked` gives).
    pub async fn post(
        &self,
        url: &str,
        addrs: &[SocketAddr],
        headers: &[(HeaderName, String)],
        body: Vec<u8>,
    ) -> Result<(), DeliveryError> {
        let parsed = check_url_shape(url).map_err(DeliveryError::BadUrl)?;
        let port = parsed.port_or_known_default().unwrap_or(80);
        if addrs.is_empty() {
            return Err(DeliveryError::NoAddress);
        }
        let client = match parsed.host() {
            // An address is connected to as it is, without resolution: it must be a checked one.
            Some(Host::Ipv4(ip)) if addrs.contains(&SocketAddr::new(ip.into(), port)) => {
                self.client_for(&ip.to_string(), &[])?
            }
            Some(Host::Ipv6(ip))
                if addrs.contains(&SocketAddr::new(ip.to_canonical(), port))
                    || addrs.contains(&SocketAddr::new(ip.into(), port)) =>
            {
                self.client_for(&format!("[{ip}]"), &[])?
            }
            Some(Host::Domain(name)) => self.client_for(name, addrs)?,
            _ => return Err(DeliveryError::NoAddress),
        };
        let mut map = HeaderMap::with_capacity(headers.len() + 2);
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        map.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("shopkeep/", env!("CARGO_PKG_VERSION"))),
        );
        for (name, value) in headers {
            let value = HeaderValue::from_str(value).map_err(|_| DeliveryError::BadHeader)?;
            map.insert(name.clone(), value);
        }
        let mut response = client
            .post(parsed)
            .headers(map)
            .body(body)
            .send()
            .await
            .map_err(|e| self.classify(&e))?;
        let status = response.status();
        // Read a little of the answer so a keep-alive connection can serve the next event; what it
        // says does not matter, and a failure to read it does not undo the status.
        let mut read = 0usize;
        while read < MAX_ANSWER_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => read += chunk.len(),
                Ok(None) | Err(_) => break,
            }
        }
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Status(status.as_u16()))
        }
    }

    /// The client for `host`, pinned to `addrs` (none for an IP-address host), built if missing or
    /// built for other addresses.
    fn client_for(
        &self,
        host: &str,
        addrs: &[SocketAddr],
    ) -> Result<reqwest::Client, DeliveryError> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((pinned, client)) = clients.get(host) {
            if pinned == addrs {
                return Ok(client.clone());
            }
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .no_proxy()
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .dns_resolver(Arc::new(NoResolution));
        if !addrs.is_empty() {
            builder = builder.resolve_to_addrs(host, addrs);
        }
        let client = builder.build().map_err(|_| DeliveryError::Client)?;
        if clients.len() >= MAX_CACHED_CLIENTS && !clients.contains_key(host) {
            clients.clear();
        }
        clients.insert(host.to_owned(), (addrs.to_vec(), client.clone()));
        Ok(client)
    }

    fn classify(&self, error: &reqwest::Error) -> DeliveryError {
        let mut io_kinds = Vec::new();
        let mut closed = false;
        let mut source = error.source();
        while let Some(cause) = source {
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                io_kinds.push(io.kind());
            }
            if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
                closed |= hyper.is_incomplete_message() || hyper.is_closed();
            }
            source = cause.source();
        }
        use std::io::ErrorKind;
        if error.is_connect() {
            if error.is_timeout() || io_kinds.contains(&ErrorKind::TimedOut) {
                DeliveryError::ConnectTimedOut(self.connect_timeout)
            } else if io_kinds.contains(&ErrorKind::ConnectionRefused) {
                DeliveryError::Refused
            } else {
                DeliveryError::Connect
            }
        } else if error.is_timeout() {
            DeliveryError::TimedOut(self.timeout)
        } else if closed
            || io_kinds.iter().any(|kind| {
                matches!(
                    kind,
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                        | ErrorKind::UnexpectedEof
                )
            })
        {
            DeliveryError::Closed
        } else {
            DeliveryError::Failed
        }
    }
}

/// The clients' DNS resolver: resolves nothing. A client knows only the checked addresses of its host
/// (`resolve_to_addrs`, consulted before the resolver), so no other name can be reached.
struct NoResolution;

impl Resolve for NoResolution {
    fn resolve(&self, _name: Name) -> Resolving {
        Box::pin(async { Err("webhook delivery resolves no names but its checked host".into()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    /// What the test server does with each connection.
    #[derive(Clone, Copy)]
    enum Answer {
        /// Reads the request and answers this head (and a body of `usize` bytes).
        Status(&'static str, usize),
        /// Reads the request and never answers.
        Hang,
        /// Closes the connection without answering.
        Close,
    }

    /// A one-purpose HTTP server on 127.0.0.1; sends each request's head and body text on the channel.
    async fn server(answer: Answer) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Answer::Close = answer {
                        return;
                    }
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    // Read until the head and a Content-Length body are in.
                    loop {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&request).to_string();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let length = head
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse::<usize>().unwrap())
                                })
                                .unwrap_or(0);
                            if body.len() >= length {
                                tx.send(text.clone()).unwrap();
                                break;
                            }
                        }
                    }
                    match answer {
                        Answer::Status(status, body_len) => {
                            let head = format!(
                                "HTTP/1.1 {status}\r\ncontent-length: {body_len}\r\nlocation: http://8.8.8.8/\r\n\r\n"
                            );
                            stream.write_all(head.as_bytes()).await.unwrap();
                            let _ = stream.write_all(&vec![b'x'; body_len]).await;
                        }
                        Answer::Hang => tokio::time::sleep(Duration::from_secs(60)).await,
                        Answer::Close => {}
                    }
                });
            }
        });
        (addr, rx)
    }

    fn signed() -> Vec<(HeaderName, String)> {
        let secret = super::super::sign::webhook_secret([3u8; 32]);
        super::super::sign::sign_headers(&secret, "evt_1", 1_700_000_000, b"{}")
            .unwrap()
            .to_vec()
    }

    fn quick() -> Deliverer {
        Deliverer::with_timeouts(Duration::from_millis(500), Duration::from_millis(500))
    }

    #[tokio::test]
    async fn a_2xx_acknowledges_and_the_request_is_signed_json() {
        let (addr, mut requests) = server(Answer::Status("204 No Content", 0)).await;
        let url = format!("http://{addr}/hook");
        quick()
            .post(&url, &[addr], &signed(), b"{\"a\":1}".to_vec())
            .await
            .unwrap();
        let request = requests.recv().await.unwrap().to_ascii_lowercase();
        assert!(request.starts_with("post /hook http/1.1\r\n"), "{request}");
        assert!(request.contains("content-type: application/json\r\n"));
        assert!(request.contains("webhook-id: evt_1\r\n"));
        assert!(request.contains("webhook-timestamp: 1700000000\r\n"));
        assert!(request.contains("webhook-signature: v1,"));
        assert!(request.ends_with("\r\n\r\n{\"a\":1}"));
    }

    #[tokio::test]
    async fn a_host_name_connects_only_to_the_checked_addresses() {
        let (addr, mut requests) = server(Answer::Status("200 OK", 10_000)).await;
        // `.invalid` never resolves: the request can only have gone to the pinned address.
        let url = format!("http://game-server.invalid:{}/e", addr.port());
        let deliverer = quick();
        deliverer
            .post(&url, &[addr], &signed(), b"{}".to_vec())
            .await
            .unwrap();
        let request = requests.recv().await.unwrap().to_ascii_lowercase();
        assert!(
            request.contains(&format!("host: game-server.invalid:{}\r\n", addr.port())),
            "{request}"
        );
        // A second event reuses the cached client.
        deliverer
            .post(&url, &[addr], &signed(), b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(deliverer.clients.lock().unwrap().len(), 1);
        // New checked addresses re-pin the host's client: the old address is no longer used. (The
        // port is the URL's; the server listens on 127.0.0.1 only, so 127.0.0.2 refuses.)
        let elsewhere = SocketAddr::new([127, 0, 0, 2].into(), addr.port());
        let err = deliverer
            .post(&url, &[elsewhere], &signed(), b"{}".to_vec())
            .await
            .unwrap_err();
        assert_eq!(
            err,
            DeliveryError::Refused,
            "re-pinned to the new checked address"
        );
    }

    #[tokio::test]
    async fn an_address_host_must_be_a_checked_address() {
        let (addr, _requests) = server(Answer::Status("200 OK", 0)).await;
        let url = format!("http://{addr}/");
        let other: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert_eq!(
            quick()
                .post(&url, &[other], &signed(), b"{}".to_vec())
                .await,
            Err(DeliveryError::NoAddress)
        );
        assert_eq!(
            quick().post(&url, &[], &signed(), b"{}".to_vec()).await,
            Err(DeliveryError::NoAddress)
        );
        assert!(matches!(
            quick()
                .post("https://x/", &[addr], &signed(), b"{}".to_vec())
                .await,
            Err(DeliveryError::BadUrl(WebhookTargetError::NotHttp))
        ));
    }

    #[tokio::test]
    async fn other_statuses_and_redirects_fail() {
        for (status, code) in [
            ("500 Internal Server Error", 500),
            ("404 Not Found", 404),
            ("302 Found", 302),
            ("301 Moved Permanently", 301),
        ] {
            let (addr, mut requests) = server(Answer::Status(status, 100)).await;
            let err = quick()
                .post(
                    &format!("http://{addr}/"),
                    &[addr],
                    &signed(),
                    b"{}".to_vec(),
                )
                .await
                .unwrap_err();
            assert_eq!(err, DeliveryError::Status(code));
            assert_eq!(err.to_string(), format!("HTTP {code}"));
            requests.recv().await.unwrap();
            assert!(requests.try_recv().is_err(), "a redirect is not followed");
        }
    }

    #[tokio::test]
    async fn timeouts_refusals_and_closed_connections_fail() {
        let (hang, _r1) = server(Answer::Hang).await;
        let err = quick()
            .post(
                &format!("http://{hang}/"),
                &[hang],
                &signed(),
                b"{}".to_vec(),
            )
            .await
            .unwrap_err();
        assert_eq!(err, DeliveryError::TimedOut(Duration::from_millis(500)));
        assert_eq!(err.to_string(), "timed out after 500 ms");
        assert_eq!(
            DeliveryError::TimedOut(TOTAL_TIMEOUT).to_string(),
            "timed out after 10 s"
        );

        let (close, _r2) = server(Answer::Close).await;
        let err = quick()
            .post(
                &format!("http://{close}/"),
                &[close],
                &signed(),
                b"{}".to_vec(),
            )
            .await
            .unwrap_err();
        assert_eq!(err, DeliveryError::Closed);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = listener.local_addr().unwrap();
        drop(listener);
        let err = quick()
            .post(
                &format!("http://{refused}/"),
                &[refused],
                &signed(),
                b"{}".to_vec(),
            )
            .await
            .unwrap_err();
        assert_eq!(err, DeliveryError::Refused);
        assert_eq!(err.to_string(), "connection refused");
    }

    #[test]
    fn every_message_is_short() {
        let all = [
            DeliveryError::Status(599),
            DeliveryError::TimedOut(Duration::from_secs(u64::MAX)),
            DeliveryError::ConnectTimedOut(CONNECT_TIMEOUT),
            DeliveryError::Refused,
            DeliveryError::Connect,
            DeliveryError::Closed,
            DeliveryError::Failed,
            DeliveryError::NoAddress,
            DeliveryError::BadUrl(WebhookTargetError::TooLong),
            DeliveryError::BadHeader,
            DeliveryError::Client,
        ];
        for error in all {
            assert!(error.to_string().len() <= 200, "{error}");
        }
        assert_eq!(
            DeliveryError::ConnectTimedOut(CONNECT_TIMEOUT).to_string(),
            "could not connect within 5 s"
        );
    }
}
