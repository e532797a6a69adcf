//! The calling side of node streams (`crate::stream`): one stream per peer address, opened by the first
//! call that rides one and again after it ends. A call takes the next id, registers for its answer and
//! writes its frame under the stream's write lock (so ids reach the callee in order); the stream's reader
//! task hands each answer to its call. When the stream ends, every call waiting on it fails as if the
//! peer were unreachable, and the next call opens a new one.
//!
//! A peer that does not know streams (an older node answers the upgrade 404) is called over HTTP, and
//! asked again after [`RETRY_REFUSED`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::sync::oneshot;

use crate::auth::{AUTH_HEADER, NodeAuth};
use crate::clock::unix_micros;
use crate::rpc::MAX_MESSAGE_BYTES;
use crate::stream::{Direction, Frame, PROTOCOL, STREAM_PATH, StreamKey, buffered};

/// How long a peer that refused to upgrade is called over HTTP before it is asked again.
const RETRY_REFUSED: Duration = Duration::from_secs(60);
/// A stream unused for this long is not used again but replaced: the callee closes streams idle for
/// twice as long (`IDLE_TIMEOUT` of the HTTP layer), and a call must never race that close.
const IDLE_REPLACED: Duration = Duration::from_secs(30);
/// The longest wait for a peer to answer the upgrade.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(2);

type Io = TokioIo<hyper::upgrade::Upgraded>;
/// A peer's stream, if one is open; locked while one is being opened.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<PeerStream>>>>;

/// Why a call did not get an answer over a stream.
#[derive(Debug)]
pub(super) enum StreamFailure {
    /// The peer cannot be reached, or the stream ended before the answer (the call may have run).
    Unreachable(String),
    /// The peer answered the upgrade with this status (401: not a member, or clocks too far apart),
    /// and its clock as it answered.
    Refused { status: u16, peer_time: Option<i64> },
    /// The peer does not take streams: call it over HTTP.
    NotSupported,
}

/// The streams of one node to its peers.
#[derive(Default)]
pub(super) struct Streams {
    /// Per peer address: its stream, opened under the slot's lock (one opening at a time per peer).
    slots: Mutex<HashMap<String, Slot>>,
    /// Peers that refused to upgrade, and when.
    refused: Mutex<HashMap<String, Instant>>,
}

/// An answer, and the callee's clock as it wrote it.
pub(super) struct Answer {
    pub(super) time_micros: i64,
    pub(super) payload: Vec<u8>,
}

impl Streams {
    /// Sends `payload` (a postcard `NodeRequest`) to `addr` over its stream and waits at most `timeout`.
    pub(super) async fn call(
        &self,
        auth: &NodeAuth,
        addr: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Answer, StreamFailure> {
        if self.refused_recently(addr) {
            return Err(StreamFailure::NotSupported);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let opening = self.stream_to(auth, addr, timeout);
        let Ok(stream) = tokio::time::timeout_at(deadline, opening).await else {
            return Err(StreamFailure::Unreachable(format!(
                "{addr}: no stream within {timeout:?}"
            )));
        };
        let stream = stream?;
        stream
            .call(payload, deadline)
            .await
            .map_err(|failure| match failure {
                StreamFailure::Unreachable(reason) => {
                    StreamFailure::Unreachable(format!("{addr}: {reason}"))
                }
                other => other,
            })
    }

    fn refused_recently(&self, addr: &str) -> bool {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        match refused.get(addr) {
            Some(at) if at.elapsed() < RETRY_REFUSED => true,
            Some(_) => {
                refused.remove(addr);
                false
            }
            None => false,
        }
    }

    /// The open stream to `addr`, opened now if there is none.
    async fn stream_to(
        &self,
        auth: &NodeAuth,
        addr: &str,
        timeout: Duration,
    ) -> Result<Arc<PeerStream>, StreamFailure> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(addr.to_owned())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(stream) = slot.as_ref().filter(|stream| stream.is_open()) {
            if stream.used_within(IDLE_REPLACED) {
                return Ok(stream.clone());
            }
            stream.end();
        }
        *slot = None;
        let opened = open(auth, addr, timeout.min(UPGRADE_TIMEOUT)).await;
        if let Err(StreamFailure::NotSupported) = opened {
            self.refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(addr.to_owned(), Instant::now());
        }
        let stream = opened?;
        *slot = Some(stream.clone());
        Ok(stream)
    }
}

/// Connects to `addr` and upgrades the connection to a stream, within `timeout`.
async fn open(
    auth: &NodeAuth,
    addr: &str,
    timeout: Duration,
) -> Result<Arc<PeerStream>, StreamFailure> {
    let unreachable =
        |e: &dyn std::fmt::Display| StreamFailure::Unreachable(format!("{addr}: {e}"));
    let upgrade = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(&e))?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(connection.with_upgrades());
        let header = auth.sign("POST", STREAM_PATH, b"");
        let request = Request::post(STREAM_PATH)
            .header(HOST, addr)
            .header(AUTH_HEADER, &header)
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, PROTOCOL)
            .body(Empty::<Bytes>::new())
            .map_err(|e| unreachable(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(&e))?;
        match response.status() {
            StatusCode::SWITCHING_PROTOCOLS => {}
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
                return Err(StreamFailure::NotSupported);
            }
            status => {
                return Err(StreamFailure::Refused {
                    status: status.as_u16(),
                    peer_time: super::stamped_time(response.headers()),
                });
            }
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| unreachable(&e))?;
        Ok(PeerStream::start(
            auth.stream_key(header.as_bytes()),
            TokioIo::new(upgraded),
        ))
    };
    tokio::time::timeout(timeout, upgrade)
        .await
        .unwrap_or_else(|_| Err(unreachable(&"no upgrade in time")))
}

/// One open stream.
struct PeerStream {
    key: StreamKey,
    /// The write half and the last id sent, under one lock: ids go out in order.
    writer: tokio::sync::Mutex<(WriteHalf<Io>, u64)>,
    /// Calls waiting for their answers, by id.
    waiting: Mutex<HashMap<u64, oneshot::Sender<Frame>>>,
    open: AtomicBool,
    /// When the last call was sent.
    last_used: Mutex<Instant>,
}

impl PeerStream {
    fn start(key: StreamKey, io: Io) -> Arc<PeerStream> {
        let (reader, writer) = tokio::io::split(io);
        let stream = Arc::new(PeerStream {
            key,
            writer: tokio::sync::Mutex::new((writer, 0)),
            waiting: Mutex::new(HashMap::new()),
            open: AtomicBool::new(true),
            last_used: Mutex::new(Instant::now()),
        });
        metrics::gauge!(crate::metrics::NODE_STREAMS, "direction" => "out").increment(1.0);
        tokio::spawn(stream.clone().read_answers(buffered(reader)));
        stream
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    fn used_within(&self, period: Duration) -> bool {
        self.last_used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            < period
    }

    /// Closes the stream and shuts it down to the peer (once no frame is being written).
    fn end(self: &Arc<Self>) {
        self.close();
        let stream = self.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = stream.writer.lock().await.0.shutdown().await;
            });
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Frame>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands each answer to its call until the stream ends, then fails the calls still waiting.
    async fn read_answers(self: Arc<Self>, mut reader: BufReader<ReadHalf<Io>>) {
        loop {
            match self
                .key
                .read(&mut reader, Direction::Answer, MAX_MESSAGE_BYTES)
                .await
            {
                Ok(frame) => {
                    if let Some(call) = self.waiting().remove(&frame.id) {
                        let _ = call.send(frame);
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "node stream ended");
                    break;
                }
            }
        }
        self.close();
    }

    /// Marks the stream closed and fails every call waiting on it (their senders drop).
    fn close(&self) {
        if self.open.swap(false, Ordering::AcqRel) {
            metrics::gauge!(crate::metrics::NODE_STREAMS, "direction" => "out").decrement(1.0);
        }
        self.waiting().clear();
    }

    /// Sends one call and waits for its answer until `deadline`.
    async fn call(
        self: &Arc<Self>,
        payload: &[u8],
        deadline: tokio::time::Instant,
    ) -> Result<Answer, StreamFailure> {
        let (answer, receiver) = oneshot::channel();
        let id = match tokio::time::timeout_at(deadline, self.send(payload, answer)).await {
            Ok(sent) => sent?,
            Err(_) => return Err(StreamFailure::Unreachable("cannot send in time".to_owned())),
        };
        match tokio::time::timeout_at(deadline, receiver).await {
            Ok(Ok(frame)) => Ok(Answer {
                time_micros: frame.time_micros,
                payload: frame.payload,
            }),
            Ok(Err(_)) => Err(closed()),
            Err(_) => {
                self.waiting().remove(&id);
                Err(StreamFailure::Unreachable("no answer in time".to_owned()))
            }
        }
    }

    /// Writes one call's frame under the next id, registered for its answer first; returns the id.
    async fn send(
        self: &Arc<Self>,
        payload: &[u8],
        answer: oneshot::Sender<Frame>,
    ) -> Result<u64, StreamFailure> {
        let mut writer = self.writer.lock().await;
        if !self.is_open() {
            return Err(closed());
        }
        let id = writer.1 + 1;
        let frame = self
            .key
            .encode(Direction::Call, id, unix_micros(), payload)
            .map_err(|e| StreamFailure::Unreachable(e.to_string()))?;
        writer.1 = id;
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.waiting().insert(id, answer);
        let mut sending = Sending {
            stream: self.clone(),
            done: false,
        };
        if let Err(error) = writer.0.write_all(&frame).await {
            tracing::debug!(%error, "cannot write to a node stream");
            return Err(closed());
        }
        sending.done = true;
        Ok(id)
    }
}

fn closed() -> StreamFailure {
    StreamFailure::Unreachable("the node stream ended".to_owned())
}

/// A frame being written. Dropped before it is whole (the call gave up, or the write failed), it ends
/// the stream, whose bytes no longer fall on frame boundaries: closed here, shut down to the peer.
struct Sending {
    stream: Arc<PeerStream>,
    done: bool,
}

impl Drop for Sending {
    fn drop(&mut self) {
        if !self.done {
            self.stream.end();
        }
    }
}
