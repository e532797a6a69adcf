//! The node-to-node stream: one long-lived connection from a node to a peer that carries many calls at
//! once, so the hot calls (appends, heartbeats, votes, forwarded writes, read indexes) cost a frame each
//! instead of an HTTP exchange.
//!
//! A stream starts as `POST /_node/v1/stream` (`STREAM_PATH`), signed like any node call (`auth`, empty
//! body) and asking to upgrade to [`PROTOCOL`]. The callee checks the signature from the headers alone,
//! as for a call, and answers `101 Switching Protocols`; from then on both sides exchange frames:
//!
//! ```text
//! len u32 LE (of what follows) | id u64 LE | time i64 LE | tag [16] | payload (postcard)
//! ```
//!
//! - `id`: the call's number. The caller numbers its calls 1, 2, 3, … and the callee refuses an id that
//!   does not grow (a replayed frame); an answer carries its call's id, and answers come in any order.
//! - `time`: the sender's clock (unix microseconds) as it wrote the frame. The callee refuses a call
//!   whose time is further from its clock than [`crate::auth::REPLAY_WINDOW`], as it refuses an HTTP
//!   call, and both sides sample each other's clock from it.
//! - `tag`: HMAC-SHA256 (first 16 bytes) over the direction, the id, the time and the payload, under a
//!   key both sides derive from the node key and the upgrade's signed header ([`StreamKey`]). A frame
//!   cannot be forged, moved to the other direction, or replayed into another stream.
//! - `payload`: a postcard [`crate::rpc::NodeRequest`] (calls) or [`crate::rpc::NodeResponse`] (answers),
//!   at most [`crate::rpc::MAX_MESSAGE_BYTES`].
//!
//! Large or rare calls (snapshot chunks, membership changes, formation) stay one HTTP call each, so a
//! snapshot never holds the stream up.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

/// The path of the upgrade request.
pub const STREAM_PATH: &str = "/_node/v1/stream";
/// The protocol named in the `upgrade` header, both ways.
pub const PROTOCOL: &str = "shopkeep-node-stream/1";
/// Bytes of a frame after its length: id, time, tag.
const HEAD_BYTES: usize = 8 + 8 + TAG_BYTES;
const TAG_BYTES: usize = 16;

/// Which way a frame goes: part of what its tag covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the node that opened the stream (a call).
    Call,
    /// From the node that accepted it (an answer).
    Answer,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Direction::Call => 0,
            Direction::Answer => 1,
        }
    }
}

/// Why a stream ends: either side closes a stream on the first bad frame.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the stream closed: {0}")]
    Closed(#[from] std::io::Error),
    #[error("a frame of {0} bytes is out of bounds")]
    Length(usize),
    #[error("a frame's tag does not match")]
    BadTag,
}

/// One frame, its tag checked.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub id: u64,
    pub time_micros: i64,
    pub payload: Vec<u8>,
}

/// Bytes a stream's reader takes from the socket at once (one per stream, at most `MAX_NODE_STREAMS`
/// on the answering side): a frame, or several pipelined ones, in one read instead of three.
pub const READ_BUFFER_BYTES: usize = 16 * 1024;

/// The reading half of a stream, buffered by [`READ_BUFFER_BYTES`].
pub fn buffered<R: AsyncRead>(reader: R) -> BufReader<R> {
    BufReader::with_capacity(READ_BUFFER_BYTES, reader)
}

/// The key of one stream's tags, held as the HMAC state keyed with it (the key's two blocks are hashed
/// once per stream, not once per frame).
#[derive(Clone)]
pub struct StreamKey(Hmac<Sha256>);

impl std::fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamKey(<key>)")
    }
}

impl StreamKey {
    /// The key of the stream opened by the upgrade signed with `auth_header`, under the node key `key`
    /// (the header's nonce makes it unique; both sides have the header).
    pub(crate) fn derive(key: &[u8; 32], auth_header: &[u8]) -> StreamKey {
        let mut mac = hmac(key);
        mac.update(b"shopkeep node stream key\n");
        mac.update(auth_header);
        StreamKey(hmac(&mac.finalize().into_bytes().into()))
    }

    fn tag(&self, direction: Direction, id: u64, time_micros: i64, payload: &[u8]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(&[direction.byte()]);
        mac.update(&id.to_le_bytes());
        mac.update(&time_micros.to_le_bytes());
        mac.update(payload);
        mac.finalize().into_bytes().into()
    }

    /// The bytes of one frame.
    pub fn encode(
        &self,
        direction: Direction,
        id: u64,
        time_micros: i64,
        payload: &[u8],
    ) -> Result<Vec<u8>, StreamError> {
        let len = u32::try_from(HEAD_BYTES + payload.len())
            .map_err(|_| StreamError::Length(payload.len()))?;
        let tag = self.tag(direction, id, time_micros, payload);
        let mut frame = Vec::with_capacity(4 + HEAD_BYTES + payload.len());
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&id.to_le_bytes());
        frame.extend_from_slice(&time_micros.to_le_bytes());
        frame.extend_from_slice(&tag[..TAG_BYTES]);
        frame.extend_from_slice(payload);
        Ok(frame)
    }

    /// Reads the next frame going `direction`, with a payload of at most `max_payload` bytes (never
    /// buffering more), and checks its tag.
    pub async fn read<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        direction: Direction,
        max_payload: usize,
    ) -> Result<Frame, StreamError> {
        let mut len = [0u8; 4];
        reader.read_exact(&mut len).await?;
        let len = usize::try_from(u32::from_le_bytes(len)).unwrap_or(usize::MAX);
        if len < HEAD_BYTES || len - HEAD_BYTES > max_payload {
            return Err(StreamError::Length(len));
        }
        let mut head = [0u8; HEAD_BYTES];
        reader.read_exact(&mut head).await?;
        let mut payload = vec![0u8; len - HEAD_BYTES];
        reader.read_exact(&mut payload).await?;
        let (id, rest) = head.split_at(8);
        let (time, tag) = rest.split_at(8);
        let id = u64::from_le_bytes(id.try_into().map_err(|_| StreamError::BadTag)?);
        let time_micros = i64::from_le_bytes(time.try_into().map_err(|_| StreamError::BadTag)?);
        let expected = self.tag(direction, id, time_micros, &payload);
        if !bool::from(expected[..TAG_BYTES].ct_eq(tag)) {
            return Err(StreamError::BadTag);
        }
        Ok(Frame {
            id,
            time_micros,
            payload,
        })
    }
}

fn hmac(key: &[u8; 32]) -> Hmac<Sha256> {
    // HMAC takes a key of any length: this cannot fail.
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(header: &[u8]) -> StreamKey {
        StreamKey::derive(&[7u8; 32], header)
    }

    async fn read(
        key: &StreamKey,
        bytes: &[u8],
        direction: Direction,
    ) -> Result<Frame, StreamError> {
        key.read(&mut &bytes[..], direction, 64).await
    }

    #[tokio::test]
    async fn a_frame_reads_back_only_under_its_key_and_direction() {
        let stream = key(b"header one");
        let bytes = stream.encode(Direction::Call, 9, -5, b"payload").unwrap();
        let frame = read(&stream, &bytes, Direction::Call).await.unwrap();
        assert_eq!(
            frame,
            Frame {
                id: 9,
                time_micros: -5,
                payload: b"payload".to_vec()
            }
        );
        assert!(matches!(
            read(&stream, &bytes, Direction::Answer).await,
            Err(StreamError::BadTag)
        ));
        assert!(matches!(
            read(&key(b"header two"), &bytes, Direction::Call).await,
            Err(StreamError::BadTag)
        ));
    }

    /// The byte at `at` of frame `frame`'s payload in the pipelining test.
    fn pattern(at: usize, frame: usize) -> u8 {
        u8::try_from((at + frame) % 251).unwrap()
    }

    #[tokio::test]
    async fn pipelined_frames_read_back_one_by_one_through_the_buffered_reader() {
        let stream = key(b"header");
        let sizes = [0, 1, READ_BUFFER_BYTES - 40, 3, READ_BUFFER_BYTES + 7, 2];
        let (mut near, far) = tokio::io::duplex(1000);
        let frames: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let payload: Vec<u8> = (0..size).map(|at| pattern(at, i)).collect();
                stream
                    .encode(Direction::Call, i as u64 + 1, 7, &payload)
                    .unwrap()
            })
            .collect();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // Written in pieces that straddle frame boundaries.
            for piece in frames.concat().chunks(333) {
                near.write_all(piece).await.unwrap();
            }
        });
        let mut reader = buffered(far);
        for (i, &size) in sizes.iter().enumerate() {
            let frame = stream
                .read(&mut reader, Direction::Call, 2 * READ_BUFFER_BYTES)
                .await
                .unwrap();
            assert_eq!(frame.id, i as u64 + 1);
            assert_eq!(frame.payload.len(), size);
            assert!(
                frame
                    .payload
                    .iter()
                    .enumerate()
                    .all(|(at, &v)| v == pattern(at, i))
            );
        }
        writer.await.unwrap();
        assert!(matches!(
            stream.read(&mut reader, Direction::Call, 64).await,
            Err(StreamError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn a_changed_byte_or_a_length_out_of_bounds_ends_the_stream() {
        let stream = key(b"header");
        let bytes = stream.encode(Direction::Answer, 1, 2, b"abc").unwrap();
        for at in 4..bytes.len() {
            let mut changed = bytes.clone();
            changed[at] ^= 1;
            assert!(
                matches!(
                    read(&stream, &changed, Direction::Answer).await,
                    Err(StreamError::BadTag)
                ),
                "byte {at} changed"
            );
        }
        let long = stream.encode(Direction::Answer, 1, 2, &[0; 65]).unwrap();
        assert!(matches!(
            read(&stream, &long, Direction::Answer).await,
            Err(StreamError::Length(_))
        ));
        let short = [1u8, 0, 0, 0, 0];
        assert!(matches!(
            read(&stream, &short, Direction::Answer).await,
            Err(StreamError::Length(1))
        ));
        assert!(matches!(
            read(&stream, &bytes[..bytes.len() - 1], Direction::Answer).await,
            Err(StreamError::Closed(_))
        ));
    }
}
