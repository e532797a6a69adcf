//! The answering side of node streams (`/_node/v1/stream`, see `shopkeep_raft::stream`): a member's
//! signed upgrade becomes a stream whose calls are answered as HTTP node calls are.
//!
//! Bounds, as for every byte from the network:
//! - the upgrade is authenticated from its headers alone, like a call, and its body must be empty;
//! - at most [`MAX_NODE_STREAMS`] streams are open at once (a member opens one per peer);
//! - a frame's payload is read up to `MAX_MESSAGE_BYTES`, and its tag is checked before it is decoded;
//!   a call's id must grow and its time be within the replay window of this node's clock;
//! - a stream's reader buffers at most `READ_BUFFER_BYTES` ahead of the frame it reads;
//! - a stream that sends no frame for [`IDLE_TIMEOUT`] is closed (heartbeats flow far more often);
//! - calls take a place among the node calls in flight (`node_traffic::MAX_NODE_CALLS_INFLIGHT`) before
//!   they run; while there is none, the stream is not read further.
//!
//! The first bad frame ends the stream: its bytes can no longer be trusted to fall on frame boundaries.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use shopkeep_raft::auth::{AUTH_HEADER, NodeAuthError, check_window};
use shopkeep_raft::clock::{Reading, unix_micros};
use shopkeep_raft::rpc::{self, MAX_MESSAGE_BYTES};
use shopkeep_raft::stream::{Direction, Frame, PROTOCOL, StreamError, StreamKey, buffered};
use tokio::io::{AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::sync::Mutex;

use super::error::ApiError;
use super::node_traffic::NodeTraffic;

/// Most node streams open at once on this node: 4 peers open one each, with room for reconnections.
pub const MAX_NODE_STREAMS: usize = 32;
/// A stream that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// An answer the peer does not take within this long closes the stream.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

type Io = TokioIo<hyper::upgrade::Upgraded>;

/// `POST /_node/v1/stream`: authenticates the upgrade and answers `101 Switching Protocols`; the
/// stream is served once hyper hands the connection over.
pub(super) async fn open(
    State(traffic): State<Arc<NodeTraffic>>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let upgrade = request.headers().get(header::UPGRADE);
    if upgrade.is_none_or(|protocol| protocol.as_bytes() != PROTOCOL.as_bytes()) {
        return Err(ApiError::invalid_request(format!(
            "a node stream must ask to upgrade to {PROTOCOL}"
        )));
    }
    let verified = traffic.authenticate(&request)?;
    verified
        .body
        .check(b"")
        .map_err(|error| traffic.refused(&error))?;
    let permit = traffic
        .streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::rate_limited("too many node streams open; retry shortly"))?;
    let key = request
        .headers()
        .get(AUTH_HEADER)
        .map(|header| traffic.auth.stream_key(header.as_bytes()))
        .ok_or_else(|| ApiError::unauthenticated_because(NodeAuthError::Missing.to_string()))?;
    let upgrading = hyper::upgrade::on(&mut request);
    let sender = verified.sender;
    tokio::spawn(async move {
        match upgrading.await {
            Ok(upgraded) => {
                let gauge =
                    metrics::gauge!(shopkeep_raft::metrics::NODE_STREAMS, "direction" => "in");
                gauge.increment(1.0);
                serve(traffic, key, sender, TokioIo::new(upgraded)).await;
                gauge.decrement(1.0);
            }
            Err(error) => tracing::debug!(%error, peer = sender, "node stream upgrade failed"),
        }
        drop(permit);
    });
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static(PROTOCOL)),
        ],
    )
        .into_response())
}

/// Serves `sender`'s stream until it ends or breaks a rule, then shuts it down: the peer then knows at
/// once that calls it sends will not be read (answers still being written fail with it).
async fn serve(traffic: Arc<NodeTraffic>, key: StreamKey, sender: u64, io: Io) {
    let (reader, writer) = tokio::io::split(io);
    let writer = Arc::new(Mutex::new(writer));
    serve_calls(&traffic, &key, sender, buffered(reader), &writer).await;
    let _ = writer.lock().await.shutdown().await;
}

/// Reads calls until the stream ends or breaks a rule; each call is answered by a task of its own, which
/// writes its answer when done (answers go out in any order).
async fn serve_calls(
    traffic: &Arc<NodeTraffic>,
    key: &StreamKey,
    sender: u64,
    mut reader: BufReader<ReadHalf<Io>>,
    writer: &Arc<Mutex<WriteHalf<Io>>>,
) {
    let mut last_id = 0;
    loop {
        let frame = match read_call(key, &mut reader).await {
            Ok(frame) => frame,
            Err(Ended::Closed(reason)) => {
                tracing::debug!(peer = sender, %reason, "node stream closed");
                return;
            }
            Err(Ended::Broken(error)) => {
                refuse(sender, &error.to_string());
                return;
            }
        };
        if frame.id <= last_id {
            refuse(sender, "a call's id did not grow (a replayed frame)");
            return;
        }
        last_id = frame.id;
        let at = Reading::now();
        let offset_micros = frame.time_micros.saturating_sub(at.unix_micros);
        if let Err(error) = check_window(sender, offset_micros) {
            let _refused = traffic.refused(&error);
            return;
        }
        let cluster = traffic.node.cluster();
        cluster.clock().observe(sender, offset_micros, at);
        let Ok(permit) = traffic.inflight.clone().acquire_owned().await else {
            return;
        };
        let Ok(call) = rpc::decode_request(&frame.payload) else {
            refuse(sender, "an undecodable node message");
            return;
        };
        let (traffic, key, writer) = (traffic.clone(), key.clone(), writer.clone());
        tokio::spawn(async move {
            let answer = traffic.node.cluster().serve_call(call).await;
            answer_call(&key, frame.id, &answer, &writer).await;
            // Held until the answer is written: a peer that stops reading stops its stream being read.
            drop(permit);
        });
    }
}

/// How a stream's reading ended.
enum Ended {
    /// The peer closed it, or sent nothing for `IDLE_TIMEOUT`.
    Closed(String),
    /// The peer broke the protocol (counted as a refusal).
    Broken(StreamError),
}

async fn read_call(key: &StreamKey, reader: &mut BufReader<ReadHalf<Io>>) -> Result<Frame, Ended> {
    match tokio::time::timeout(
        IDLE_TIMEOUT,
        key.read(reader, Direction::Call, MAX_MESSAGE_BYTES),
    )
    .await
    {
        Ok(Ok(frame)) => Ok(frame),
        Ok(Err(StreamError::Closed(error))) => Err(Ended::Closed(error.to_string())),
        Ok(Err(error)) => Err(Ended::Broken(error)),
        Err(_) => Err(Ended::Closed(format!("idle for {IDLE_TIMEOUT:?}"))),
    }
}

/// Writes the answer to call `id`; a stream that cannot take it is shut down (a write cut short leaves
/// it off a frame boundary).
async fn answer_call(
    key: &StreamKey,
    id: u64,
    answer: &rpc::NodeResponse,
    writer: &Mutex<WriteHalf<Io>>,
) {
    let frame = rpc::encode_response(answer)
        .map_err(|error| error.to_string())
        .and_then(|bytes| {
            key.encode(Direction::Answer, id, unix_micros(), &bytes)
                .map_err(|error| error.to_string())
        });
    let mut writer = writer.lock().await;
    let written = match frame {
        Ok(frame) => match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&frame)).await {
            Ok(written) => written.map_err(|e| e.to_string()),
            Err(_) => Err(format!("the peer took no answer for {WRITE_TIMEOUT:?}")),
        },
        Err(error) => Err(error),
    };
    if let Err(error) = written {
        tracing::debug!(%error, "cannot answer over a node stream; closing it");
        let _ = writer.shutdown().await;
    }
}

/// Counts a stream ended for breaking the protocol, and says why.
fn refuse(sender: u64, reason: &str) {
    metrics::counter!(crate::metrics::NODE_TRAFFIC_REFUSED).increment(1);
    tracing::warn!(peer = sender, reason, "node stream closed");
}
