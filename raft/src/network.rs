//! Node-to-node calls: the frequent ones over one stream per peer (`crate::stream`, `streams`), the
//! others over a keep-alive HTTP client; postcard bodies, a MAC on every call (`auth`), a deadline on
//! every call, no redirects, answers read up to a size bound, and the openraft network of each shard on
//! top of it.
//!
//! Addresses come from the node's own `--peers` first and from the membership second, so an operator
//! (or a test putting a proxy in between) decides how this node reaches the others. A replication
//! stream's commit notices are held back when the follower already confirmed what they ask (`notices`).

pub(crate) mod notices;
mod streams;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};

use self::notices::{Held, Next, Notices};
use self::streams::{StreamFailure, Streams};
use crate::TypeConfig;
use crate::auth::{AUTH_HEADER, NodeAuth};
use crate::clock::{ClockWatch, Reading, TIME_HEADER};
use crate::log_store::Flushed;
use crate::peer_health::PeerHealth;
use crate::rpc::{CALL_PATH, MAX_MESSAGE_BYTES, NodeRequest, NodeResponse};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("{addr} answered {status}")]
    Status { addr: String, status: u16 },
    #[error("bad message from {addr}: {reason}")]
    Decode { addr: String, reason: String },
    #[error("cannot encode a message: {0}")]
    Encode(String),
}

/// The node's client for calls to other nodes.
pub struct Transport {
    client: reqwest::Client,
    auth: Arc<NodeAuth>,
    /// Fed with the time each peer stamps on its answers.
    clock: Arc<ClockWatch>,
    peers: RwLock<BTreeMap<u64, String>>,
    /// Which peers fail their calls (logged as changes).
    health: PeerHealth,
    streams: Streams,
}

impl Transport {
    pub fn new(
        auth: Arc<NodeAuth>,
        clock: Arc<ClockWatch>,
        peers: BTreeMap<u64, String>,
    ) -> Transport {
        let client = reqwest::Client::builder()
            // A redirect would send a signed call somewhere the operator did not name.
            .redirect(reqwest::redirect::Policy::none())
            // Shorter than the servers' header-read timeout (default 30 s), which closes idle
            // connections: a pooled connection is dropped here before the other side drops it.
            .pool_idle_timeout(Duration::from_secs(15))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(1))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Transport {
            client,
            auth,
            clock,
            peers: RwLock::new(peers),
            health: PeerHealth::default(),
            streams: Streams::default(),
        }
    }

    /// The address this node uses for `node`: its own peer list first, else `fallback`.
    pub fn address_of(&self, node: u64, fallback: &str) -> String {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .cloned()
            .unwrap_or_else(|| fallback.to_owned())
    }

    pub fn remember(&self, node: u64, addr: &str) {
        self.peers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node)
            .or_insert_with(|| addr.to_owned());
    }

    pub fn peers(&self) -> BTreeMap<u64, String> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The ids of the nodes this node knows, itself included (no addresses copied: asked per proposal).
    pub fn peer_ids(&self) -> Vec<u64> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Sends `request` to the node at `addr` and waits at most `timeout` for its answer.
    pub async fn call(
        &self,
        addr: &str,
        request: &NodeRequest,
        timeout: Duration,
    ) -> Result<NodeResponse, TransportError> {
        let body = crate::encode(request).map_err(|e| TransportError::Encode(e.to_string()))?;
        let started = Instant::now();
        let sent = Reading::now();
        // Looked up once: the health, the clock and the call's metric are all the callee's.
        let node = self.node_at(addr);
        let answered = if request.rides_stream() {
            self.call_over_stream(addr, &body, timeout).await
        } else {
            None
        };
        let answered = match answered {
            Some(answered) => answered,
            None => self.call_over_http(addr, body, timeout).await,
        };
        let answered = match answered {
            Ok(answered) => {
                self.health.answered(addr, node);
                answered
            }
            Err(error) => {
                self.health.failed(addr, node, &error.to_string());
                return Err(error);
            }
        };
        // Sampled from any answer, a refusal too: a node refused for its clock learns how far off it is.
        if let (Some(peer), Some(peer_time)) = (node, answered.peer_time) {
            self.clock
                .observe_answer(peer, sent, Reading::now(), peer_time);
        }
        let bytes = answered.body?;
        let answer = crate::decode(&bytes).map_err(|e| TransportError::Decode {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?;
        record_call(node, request.kind(), started);
        Ok(answer)
    }

    /// The peer's answer over the stream to `addr` (`Err`: unreachable); `None` if `addr` takes no
    /// streams (the call goes over HTTP).
    async fn call_over_stream(
        &self,
        addr: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Option<Result<Answered, TransportError>> {
        Some(
            match self.streams.call(&self.auth, addr, body, timeout).await {
                Ok(answer) => Ok(Answered {
                    peer_time: Some(answer.time_micros),
                    body: Ok(answer.payload),
                }),
                Err(StreamFailure::NotSupported) => return None,
                Err(StreamFailure::Refused { status, peer_time }) => Ok(Answered {
                    peer_time,
                    body: Err(TransportError::Status {
                        addr: addr.to_owned(),
                        status,
                    }),
                }),
                Err(StreamFailure::Unreachable(reason)) => Err(TransportError::Unreachable {
                    addr: addr.to_owned(),
                    reason,
                }),
            },
        )
    }

    /// The peer's answer to one HTTP call (`Err`: unreachable).
    async fn call_over_http(
        &self,
        addr: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Answered, TransportError> {
        let authorization = self.auth.sign("POST", CALL_PATH, &body);
        let response = self
            .client
            .post(format!("http://{addr}{CALL_PATH}"))
            .header(AUTH_HEADER, authorization)
            .header("content-type", "application/octet-stream")
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| TransportError::Unreachable {
                addr: addr.to_owned(),
                reason: e.to_string(),
            })?;
        let peer_time = stamped_time(response.headers());
        let status = response.status();
        let body = if status.is_success() {
            read_bounded(response, MAX_MESSAGE_BYTES)
                .await
                .map_err(|reason| TransportError::Decode {
                    addr: addr.to_owned(),
                    reason,
                })
        } else {
            Err(TransportError::Status {
                addr: addr.to_owned(),
                status: status.as_u16(),
            })
        };
        Ok(Answered { peer_time, body })
    }
}

/// What a peer answered: the body (or why it is not one), and its clock as it answered, if it said.
struct Answered {
    peer_time: Option<i64>,
    body: Result<Vec<u8>, TransportError>,
}

impl Transport {
    /// The id of the node this node reaches at `addr`, if it is a known member.
    fn node_at(&self, addr: &str) -> Option<u64> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, address)| address.as_str() == addr)
            .map(|(id, _)| *id)
    }

    /// Whether node `node`'s last call succeeded (or none failed yet).
    pub fn answers(&self, node: u64) -> bool {
        let addr = self.address_of(node, "");
        addr.is_empty() || !self.health.is_failing(&addr)
    }
}

/// The time a node stamped on its answer (`TIME_HEADER`), if it did.
fn stamped_time(headers: &hyper::HeaderMap) -> Option<i64> {
    headers
        .get(TIME_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<i64>().ok())
}

/// Records an answered call's time under its kind and the callee's id.
fn record_call(node: Option<u64>, kind: &'static str, started: Instant) {
    let peer = node.map_or_else(|| "unknown".to_owned(), |id| id.to_string());
    metrics::histogram!(crate::metrics::NODE_CALL_SECONDS, "call" => kind, "peer" => peer)
        .record(started.elapsed().as_secs_f64());
}

/// Reads an answer's body, refusing it as soon as it is longer than `limit` (never buffering more).
async fn read_bounded(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(format!("answer larger than {limit} bytes"));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if bytes.len() + chunk.len() > limit {
            return Err(format!("answer larger than {limit} bytes"));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The openraft network of one shard.
pub struct ShardNetwork {
    pub(crate) shard: u32,
    pub(crate) local: u64,
    pub(crate) transport: Arc<Transport>,
    /// How long a commit notice is held (`notices::hold_for` the heartbeat).
    pub(crate) hold: Duration,
    /// How far the shard's log is durable here: no follower is told more is committed (`None`: the
    /// log acknowledges appends once durable, see `log_store::flushed`).
    pub(crate) flushed: Option<Flushed>,
}

impl RaftNetworkFactory<TypeConfig> for ShardNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        // openraft never asks for a client to itself (its leader asserts so); check it anyway.
        debug_assert_ne!(target, self.local, "a network client to the local node");
        PeerClient {
            shard: self.shard,
            target,
            addr: self.transport.address_of(target, &node.addr),
            transport: self.transport.clone(),
            notices: Arc::new(tokio::sync::Mutex::new(Notices::new(self.hold))),
            flushed: self.flushed.clone(),
        }
    }
}

/// Calls to one peer for one shard.
pub struct PeerClient {
    shard: u32,
    target: u64,
    addr: String,
    transport: Arc<Transport>,
    /// What the follower confirmed to this client and the commit notice held back for it. The lock is
    /// held while a call is sent, so a held notice and the stream's next call never cross.
    notices: Arc<tokio::sync::Mutex<Notices>>,
    flushed: Option<Flushed>,
}

/// `rpc` with its committed index no further than `flushed` (see `log_store::flushed`), as it leaves.
fn clamped(
    mut rpc: AppendEntriesRequest<TypeConfig>,
    flushed: Option<&Flushed>,
) -> AppendEntriesRequest<TypeConfig> {
    if let Some(flushed) = flushed {
        rpc.leader_commit = flushed.clamp(rpc.leader_commit);
    }
    rpc
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl PeerClient {
    async fn send(
        &self,
        request: NodeRequest,
        option: &RPCOption,
    ) -> Result<NodeResponse, TransportError> {
        self.transport
            .call(&self.addr, &request, option.hard_ttl())
            .await
    }

    fn failed<E: std::error::Error>(
        &self,
        error: TransportError,
    ) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
        match error {
            TransportError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&error)),
            other => RPCError::Network(NetworkError::new(&other)),
        }
    }

    fn unexpected<E: std::error::Error>(
        &self,
        answer: &NodeResponse,
    ) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
        if let NodeResponse::Rebuilding { shard } = answer {
            // It lost its data and takes no part until it has caught up: like a node that is down,
            // and retried after the back-off.
            return self.failed(TransportError::Unreachable {
                addr: self.addr.clone(),
                reason: format!("rebuilding shard {shard}, takes no part yet"),
            });
        }
        if let NodeResponse::DiskFull { shard } = answer {
            return self.failed(TransportError::Unreachable {
                addr: self.addr.clone(),
                reason: format!("its disk is full: no snapshot of shard {shard} now"),
            });
        }
        let error = TransportError::Decode {
            addr: self.addr.clone(),
            reason: format!("unexpected answer {answer:?}"),
        };
        RPCError::Network(NetworkError::new(&error))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        let now = Instant::now();
        let mut notices = self.notices.lock().await;
        if notices.answers(&rpc, now) {
            if notices.hold(rpc, option.hard_ttl(), now) {
                tokio::spawn(send_held(
                    self.transport.clone(),
                    self.addr.clone(),
                    self.shard,
                    self.notices.clone(),
                    self.flushed.clone(),
                ));
            }
            return Ok(AppendEntriesResponse::Success);
        }
        notices.supersede();
        let (vote, last) = (rpc.vote, notices::last_of(&rpc));
        // Forgotten while the call is out: a call that times out confirms nothing.
        notices.answered(&vote, last, false, now);
        let (shard, rpc) = (self.shard, clamped(rpc, self.flushed.as_ref()));
        let answer = self.send(NodeRequest::Append { shard, rpc }, &option).await;
        notices.answered(&vote, last, is_success(&answer), Instant::now());
        match answer {
            Ok(NodeResponse::Append(Ok(response))) => Ok(response),
            Ok(NodeResponse::Append(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(other) => Err(self.unexpected(&other)),
            Err(error) => Err(self.failed(error)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        let shard = self.shard;
        match self
            .send(NodeRequest::InstallSnapshot { shard, rpc }, &option)
            .await
        {
            Ok(NodeResponse::InstallSnapshot(Ok(response))) => Ok(response),
            Ok(NodeResponse::InstallSnapshot(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(other) => Err(self.unexpected(&other)),
            Err(error) => Err(self.failed(error)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>> {
        let shard = self.shard;
        match self.send(NodeRequest::Vote { shard, rpc }, &option).await {
            Ok(NodeResponse::Vote(Ok(response))) => Ok(response),
            Ok(NodeResponse::Vote(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(other) => Err(self.unexpected(&other)),
            Err(error) => Err(self.failed(error)),
        }
    }
}

fn is_success(answer: &Result<NodeResponse, TransportError>) -> bool {
    matches!(
        answer,
        Ok(NodeResponse::Append(Ok(AppendEntriesResponse::Success)))
    )
}

/// Sends the commit notice held for one follower of `shard` once it was held long enough
/// (unless the stream's next call carried it first), and records the follower's answer.
async fn send_held(
    transport: Arc<Transport>,
    addr: String,
    shard: u32,
    notices: Arc<tokio::sync::Mutex<Notices>>,
    flushed: Option<Flushed>,
) {
    loop {
        let mut guard = notices.lock().await;
        match guard.next(Instant::now()) {
            Next::Stop => return,
            Next::Wait(remaining) => {
                drop(guard);
                tokio::time::sleep(remaining).await;
            }
            Next::Send => {
                let Some(Held { rpc, ttl, .. }) = guard.take() else {
                    return;
                };
                let (vote, last) = (rpc.vote, notices::last_of(&rpc));
                let rpc = clamped(rpc, flushed.as_ref());
                let answer = transport
                    .call(&addr, &NodeRequest::Append { shard, rpc }, ttl)
                    .await;
                guard.answered(&vote, last, is_success(&answer), Instant::now());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::auth::NodeAuth;

    /// A one-shot HTTP server on loopback that answers its first request with `answer`; reports whether
    /// anything connected.
    async fn answer_once(answer: Vec<u8>) -> (String, tokio::task::JoinHandle<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let task = tokio::spawn(async move {
            let accepted =
                tokio::time::timeout(Duration::from_millis(800), listener.accept()).await;
            let Ok(Ok((mut stream, _))) = accepted else {
                return false;
            };
            let mut head = vec![0u8; 64 * 1024];
            let _ = stream.read(&mut head).await;
            let _ = stream.write_all(&answer).await;
            let _ = stream.shutdown().await;
            true
        });
        (addr, task)
    }

    fn transport() -> Transport {
        Transport::new(
            Arc::new(NodeAuth::new([1; 32], 1)),
            Arc::default(),
            BTreeMap::new(),
        )
    }

    /// A peer of an older version on loopback: it answers the stream's upgrade 404 and each HTTP call
    /// with `answer`; counts the upgrades it was asked for and the calls it answered.
    async fn older_peer(answer: NodeResponse) -> (String, Arc<std::sync::Mutex<(u32, u32)>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let seen = Arc::new(std::sync::Mutex::new((0, 0)));
        let body = crate::rpc::encode_response(&answer).expect("encode");
        let counts = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (counts, body) = (counts.clone(), body.clone());
                tokio::spawn(async move {
                    loop {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push(byte[0]);
                        }
                        let head = String::from_utf8_lossy(&head).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|line| line.strip_prefix("content-length: "))
                            .and_then(|n| n.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        let mut request_body = vec![0u8; length];
                        let _ = stream.read_exact(&mut request_body).await;
                        let answer = if head.starts_with("post /_node/v1/stream ") {
                            counts.lock().expect("counts").0 += 1;
                            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec()
                        } else {
                            counts.lock().expect("counts").1 += 1;
                            let mut answer = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            answer.extend_from_slice(&body);
                            answer
                        };
                        if stream.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_peer_that_takes_no_stream_is_called_over_http_and_not_asked_again_at_once() {
        let (addr, seen) = older_peer(NodeResponse::ReadIndex(Ok(7))).await;
        let transport = transport();
        for _ in 0..3 {
            let answer = transport
                .call(
                    &addr,
                    &NodeRequest::ReadIndex { shard: 0 },
                    Duration::from_secs(2),
                )
                .await;
            assert!(
                matches!(answer, Ok(NodeResponse::ReadIndex(Ok(7)))),
                "{answer:?}"
            );
        }
        assert_eq!(
            *seen.lock().expect("counts"),
            (1, 3),
            "one upgrade asked for, three calls over HTTP"
        );
    }

    #[tokio::test]
    async fn calls_to_a_peer_that_never_answers_the_upgrade_fail_by_their_own_deadlines() {
        // It accepts connections and says nothing: each call's deadline bounds its wait for the stream,
        // the wait for another call's opening included.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let transport = Arc::new(transport());
        let started = std::time::Instant::now();
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let (transport, addr) = (transport.clone(), addr.clone());
                tokio::spawn(async move {
                    transport
                        .call(
                            &addr,
                            &NodeRequest::ReadIndex { shard: 0 },
                            Duration::from_millis(300),
                        )
                        .await
                })
            })
            .collect();
        for call in calls {
            let answer = call.await.expect("task");
            assert!(
                matches!(answer, Err(TransportError::Unreachable { .. })),
                "{answer:?}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_millis(600),
            "three calls of 300 ms took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_call_fails_as_unreachable_as_soon_as_its_stream_ends() {
        // Upgraded, then closed before any answer: the call fails at once, not at its deadline.
        let (addr, _) = answer_once(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: shopkeep-node-stream/1\r\n\r\n"
                .to_vec(),
        )
        .await;
        let started = std::time::Instant::now();
        let answer = transport()
            .call(
                &addr,
                &NodeRequest::ReadIndex { shard: 0 },
                Duration::from_secs(10),
            )
            .await;
        assert!(
            matches!(answer, Err(TransportError::Unreachable { .. })),
            "{answer:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the call waited {:?} for a stream that had ended",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let (target, target_hit) = answer_once(b"HTTP/1.1 200 OK\r\n\r\n".to_vec()).await;
        let redirect = format!(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{target}{CALL_PATH}\r\nContent-Length: 0\r\n\r\n"
        );
        let (addr, _) = answer_once(redirect.into_bytes()).await;
        let result = transport()
            .call(&addr, &NodeRequest::Probe, Duration::from_secs(2))
            .await;
        assert!(
            matches!(result, Err(TransportError::Status { status: 307, .. })),
            "{result:?}"
        );
        assert!(
            !target_hit.await.expect("task"),
            "the redirect was followed"
        );
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_bound_is_refused_whether_declared_or_streamed() {
        let declared = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\nxx",
            MAX_MESSAGE_BYTES + 1
        );
        let (addr, _) = answer_once(declared.into_bytes()).await;
        let result = transport()
            .call(&addr, &NodeRequest::Probe, Duration::from_secs(2))
            .await;
        assert!(
            matches!(&result, Err(TransportError::Decode { reason, .. }) if reason.contains("larger")),
            "{result:?}"
        );

        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..8 {
            chunked.extend_from_slice(b"200\r\n");
            chunked.extend_from_slice(&[0u8; 0x200]);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let (addr, _) = answer_once(chunked).await;
        let response = reqwest::Client::new()
            .get(format!("http://{addr}/"))
            .send()
            .await
            .expect("response");
        let read = read_bounded(response, 1024).await;
        assert!(
            read.as_ref().is_err_and(|e| e.contains("larger")),
            "{read:?}"
        );
    }

    /// A peer on loopback that answers every append with `answer(request)` and keeps what it received.
    async fn fake_peer(
        answer: fn(&AppendEntriesRequest<TypeConfig>) -> AppendEntriesResponse<u64>,
    ) -> (
        String,
        Arc<std::sync::Mutex<Vec<AppendEntriesRequest<TypeConfig>>>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_appends(stream, answer, kept.clone()));
            }
        });
        (addr, received)
    }

    /// Answers HTTP/1.1 requests on one connection until it closes (a node of a version without streams).
    async fn serve_appends(
        mut stream: tokio::net::TcpStream,
        answer: fn(&AppendEntriesRequest<TypeConfig>) -> AppendEntriesResponse<u64>,
        received: Arc<std::sync::Mutex<Vec<AppendEntriesRequest<TypeConfig>>>>,
    ) {
        let mut buffer = Vec::new();
        loop {
            let head_end = loop {
                if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0);
            while buffer.len() < head_end + length {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            }
            let body: Vec<u8> = buffer.drain(..head_end + length).skip(head_end).collect();
            if head.starts_with("post /_node/v1/stream ") {
                // A peer that takes no streams: its appends come as HTTP calls.
                let refused = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
                if stream.write_all(refused).await.is_err() {
                    return;
                }
                continue;
            }
            let Ok(NodeRequest::Append { rpc, .. }) = crate::rpc::decode_request(&body) else {
                return;
            };
            let response = NodeResponse::Append(Ok(answer(&rpc)));
            received.lock().expect("lock").push(rpc);
            let bytes = crate::rpc::encode_response(&response).expect("encode");
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", bytes.len());
            if stream.write_all(head.as_bytes()).await.is_err()
                || stream.write_all(&bytes).await.is_err()
            {
                return;
            }
        }
    }

    fn log_id(index: u64) -> crate::LogId {
        crate::LogId::new(openraft::CommittedLeaderId::new(2, 1), index)
    }

    /// An append of the leader of term 2 after entry `prev`, with entries up to `last`, committed to `commit`.
    fn append(prev: u64, last: u64, commit: u64) -> AppendEntriesRequest<TypeConfig> {
        let mut vote = crate::Vote::new(2, 1);
        vote.commit();
        AppendEntriesRequest {
            vote,
            prev_log_id: Some(log_id(prev)),
            entries: (prev + 1..=last)
                .map(|index| crate::Entry {
                    log_id: log_id(index),
                    payload: openraft::EntryPayload::Blank,
                })
                .collect(),
            leader_commit: Some(log_id(commit)),
        }
    }

    async fn client_to(addr: &str) -> PeerClient {
        let mut peers = BTreeMap::new();
        peers.insert(2, addr.to_owned());
        let transport = Transport::new(Arc::new(NodeAuth::new([1; 32], 1)), Arc::default(), peers);
        let mut network = ShardNetwork {
            shard: 0,
            local: 1,
            transport: Arc::new(transport),
            hold: notices::HOLD,
            flushed: None,
        };
        network.new_client(2, &BasicNode::new(addr)).await
    }

    fn option() -> RPCOption {
        RPCOption::new(Duration::from_secs(2))
    }

    /// What the peer received: (entries, commit index) of each append.
    fn seen(
        received: &std::sync::Mutex<Vec<AppendEntriesRequest<TypeConfig>>>,
    ) -> Vec<(usize, u64)> {
        received
            .lock()
            .expect("lock")
            .iter()
            .map(|rpc| {
                (
                    rpc.entries.len(),
                    rpc.leader_commit.map_or(0, |id| id.index),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn a_confirmed_commit_notice_is_answered_at_once_and_sent_later_unless_the_next_append_carries_it()
     {
        let (addr, received) = fake_peer(|_| AppendEntriesResponse::Success).await;
        let mut client = client_to(&addr).await;

        let answer = client.append_entries(append(4, 5, 4), option()).await;
        assert!(
            matches!(answer, Ok(AppendEntriesResponse::Success)),
            "{answer:?}"
        );
        let answer = client.append_entries(append(5, 5, 5), option()).await;
        assert!(
            matches!(answer, Ok(AppendEntriesResponse::Success)),
            "{answer:?}"
        );
        assert_eq!(seen(&received), [(1, 4)], "the notice is held");
        client
            .append_entries(append(5, 6, 5), option())
            .await
            .expect("append");
        tokio::time::sleep(notices::HOLD * 5).await;
        assert_eq!(
            seen(&received),
            [(1, 4), (1, 5)],
            "the next append carried the notice's commit"
        );

        client
            .append_entries(append(6, 6, 6), option())
            .await
            .expect("notice");
        client
            .append_entries(append(6, 6, 6), option())
            .await
            .expect("heartbeat");
        assert_eq!(seen(&received), [(1, 4), (1, 5)]);
        tokio::time::sleep(notices::HOLD * 5).await;
        assert_eq!(
            seen(&received),
            [(1, 4), (1, 5), (0, 6)],
            "nothing carried it: sent once, after HOLD"
        );
    }

    #[tokio::test]
    async fn a_client_without_a_confirmation_sends_its_notice_before_it_answers() {
        // openraft's read barrier asks each follower through a client made for that one call.
        let (addr, received) = fake_peer(|_| AppendEntriesResponse::Success).await;
        let mut client = client_to(&addr).await;
        client
            .append_entries(append(5, 5, 5), option())
            .await
            .expect("notice");
        assert_eq!(seen(&received), [(0, 5)]);
    }

    #[tokio::test]
    async fn a_held_notice_the_follower_refuses_sends_the_next_call_out_with_its_answer() {
        let (addr, received) = fake_peer(|rpc| {
            if rpc.entries.is_empty() {
                AppendEntriesResponse::HigherVote(crate::Vote::new(3, 2))
            } else {
                AppendEntriesResponse::Success
            }
        })
        .await;
        let mut client = client_to(&addr).await;
        client
            .append_entries(append(4, 5, 4), option())
            .await
            .expect("append");
        let held = client.append_entries(append(5, 5, 5), option()).await;
        assert!(
            matches!(held, Ok(AppendEntriesResponse::Success)),
            "{held:?}"
        );
        tokio::time::sleep(notices::HOLD * 5).await;
        assert_eq!(
            seen(&received),
            [(1, 4), (0, 5)],
            "sent after HOLD, and refused"
        );

        let next = client.append_entries(append(5, 5, 5), option()).await;
        assert!(
            matches!(next, Ok(AppendEntriesResponse::HigherVote(_))),
            "{next:?}"
        );
        assert_eq!(seen(&received), [(1, 4), (0, 5), (0, 5)]);
    }
}
