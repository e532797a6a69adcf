//! The load workers' HTTP client: one keep-alive HTTP/1.1 connection per worker and node, made with
//! hyper's `client::conn::http1` and driven inside the worker's own task. No pool to check out from, no
//! URL parsed per request, no task per connection, no timer but the request's deadline.
//!
//! Why not the pooled `reqwest` client the seeding and the audit use: the load generator shares the two
//! cores with the servers it measures, and pgbench, PostgreSQL's client, is a C program on a Unix socket.
//! With `reqwest` (and two runtime workers) the generator took ~80 µs of CPU per purchase at one client
//! and ~23 µs at 256; with this client and one worker, ~52 and ~14 µs (docs/BENCHMARKS.md,
//! twenty-second session).

use std::time::Duration;

use futures_util::FutureExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{Connection, SendRequest, handshake};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::SERVICE_TOKEN;

/// The longest a request may take, connecting included (the pooled client's timeout).
const TIMEOUT: Duration = Duration::from_secs(30);

/// An open connection: the request sender and the connection it writes to (polled with each request).
struct Open {
    sender: SendRequest<Full<Bytes>>,
    connection: Connection<TokioIo<TcpStream>, Full<Bytes>>,
}

/// A worker's connections, at most one per node, opened when first used and again after a failure.
pub(crate) struct Conns {
    /// Each node's `host:port`, for the TCP connection and the `Host` header.
    authorities: Vec<HeaderValue>,
    open: Vec<Option<Open>>,
    authorization: HeaderValue,
}

/// A request of the load: the method, the path, and for a POST its JSON body and idempotency key.
pub(crate) struct Call<'a> {
    pub(crate) method: Method,
    pub(crate) path: &'a str,
    pub(crate) body: Option<(Bytes, String)>,
}

impl Conns {
    /// Connections to the nodes at `bases` (`http://host:port`), none open yet.
    pub(crate) fn new(bases: &[String]) -> Conns {
        let authorities = bases
            .iter()
            .map(|base| {
                let authority = base.strip_prefix("http://").unwrap_or(base);
                HeaderValue::from_str(authority).expect("a node's address")
            })
            .collect::<Vec<_>>();
        let authorization = HeaderValue::from_str(&format!("Bearer {SERVICE_TOKEN}"))
            .expect("the service token is a header value");
        Conns {
            open: authorities.iter().map(|_| None).collect(),
            authorities,
            authorization,
        }
    }

    /// Sends `call` to node `node` and reads the whole answer. Err: the failure's bucket (`timeout`,
    /// `transport`); the connection is then closed, and the next request opens a new one.
    pub(crate) async fn send(
        &mut self,
        node: usize,
        call: Call<'_>,
    ) -> Result<(StatusCode, Bytes), String> {
        let request = self.request(node, call);
        let exchanged = tokio::time::timeout(TIMEOUT, self.exchange(node, request)).await;
        match exchanged {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(())) => {
                self.open[node] = None;
                Err("transport".into())
            }
            Err(_) => {
                self.open[node] = None;
                Err("timeout".into())
            }
        }
    }

    fn request(&self, node: usize, call: Call<'_>) -> Request<Full<Bytes>> {
        let mut builder = Request::builder()
            .method(call.method)
            .uri(call.path)
            .header(HOST, self.authorities[node].clone())
            .header(AUTHORIZATION, self.authorization.clone());
        let body = match call.body {
            Some((json, key)) => {
                builder = builder
                    .header("idempotency-key", key)
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                json
            }
            None => Bytes::new(),
        };
        builder
            .body(Full::new(body))
            .expect("a well-formed request")
    }

    /// Opens the connection to `node` if it is not open, sends `request` on it and reads the answer.
    async fn exchange(
        &mut self,
        node: usize,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), ()> {
        if self.open[node].is_none() {
            self.open[node] = Some(self.connect(node).await?);
        }
        let Some(Open { sender, connection }) = self.open[node].as_mut() else {
            return Err(());
        };
        let (ended, answer) = {
            let work = async {
                sender.ready().await.map_err(|_| ())?;
                let response = sender.send_request(request).await.map_err(|_| ())?;
                let status = response.status();
                let body = response.into_body().collect().await.map_err(|_| ())?;
                Ok((status, body.to_bytes()))
            };
            tokio::pin!(work);
            // The connection does the reading and writing, so it is polled beside the request. Should it end
            // first (the node closed it), whatever answer it read is already in the request's channels, so
            // one more poll takes it; anything else is a failure. The connection is not used again.
            let ended = tokio::select! {
                biased;
                answer = &mut work => return answer,
                ended = connection => ended,
            };
            (ended, work.now_or_never())
        };
        self.open[node] = None;
        match (ended, answer) {
            (Ok(()), Some(answer)) => answer,
            _ => Err(()),
        }
    }

    async fn connect(&self, node: usize) -> Result<Open, ()> {
        let address = self.authorities[node].to_str().map_err(|_| ())?;
        let stream = TcpStream::connect(address).await.map_err(|_| ())?;
        stream.set_nodelay(true).map_err(|_| ())?;
        let (sender, connection) = handshake(TokioIo::new(stream)).await.map_err(|_| ())?;
        Ok(Open { sender, connection })
    }
}
