//! Many commands in one log entry (proposal batching): the unit the log fsyncs, replicates and applies.
//!
//! openraft 0.9 appends one client write at a time and waits for its fsync, so one command per entry
//! would cost one fsync per command per shard. Instead each node collects the commands waiting for a
//! shard and proposes them as ONE entry; the state machine applies the entry's commands in order in one
//! transaction and answers one reply per command, in the same order.
//!
//! Encoding: `count (u32 LE)`, then per item `length (u32 LE) | bytes`.

/// Most items in one batch (commands of an entry, or their replies).
pub const MAX_ITEMS: usize = 65_536;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed batch: {0}")]
pub struct BatchError(&'static str);

/// A count or size as its 4-byte field: every batch is far under 4 GiB (a message is at most
/// `rpc::MAX_MESSAGE_BYTES`), so a larger one is a bug, not input.
fn length(n: usize) -> u32 {
    u32::try_from(n).expect("a batch field under 4 GiB")
}

pub fn encode<T: AsRef<[u8]>>(items: &[T]) -> Vec<u8> {
    let size = 4 + items.iter().map(|i| 4 + i.as_ref().len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&length(items.len()).to_le_bytes());
    for item in items {
        out.extend_from_slice(&length(item.as_ref().len()).to_le_bytes());
        out.extend_from_slice(item.as_ref());
    }
    out
}

pub fn decode(bytes: &[u8]) -> Result<Vec<&[u8]>, BatchError> {
    let (count, mut rest) = take_u32(bytes)?;
    if count as usize > MAX_ITEMS {
        return Err(BatchError("too many items"));
    }
    let mut items = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (len, after) = take_u32(rest)?;
        let len = len as usize;
        if after.len() < len {
            return Err(BatchError("item longer than the batch"));
        }
        items.push(&after[..len]);
        rest = &after[len..];
    }
    if !rest.is_empty() {
        return Err(BatchError("trailing bytes"));
    }
    Ok(items)
}

fn take_u32(bytes: &[u8]) -> Result<(u32, &[u8]), BatchError> {
    match bytes.split_first_chunk::<4>() {
        Some((head, rest)) => Ok((u32::from_le_bytes(*head), rest)),
        None => Err(BatchError("truncated")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_malformed_ones_are_refused() {
        let items: Vec<Vec<u8>> = vec![b"one".to_vec(), Vec::new(), vec![7u8; 300]];
        let bytes = encode(&items);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded, items.iter().map(Vec::as_slice).collect::<Vec<_>>());
        assert_eq!(decode(&encode::<Vec<u8>>(&[])).unwrap().len(), 0);
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(&[bytes.as_slice(), b"x"].concat()).is_err());
        assert!(decode(&[1, 0, 0]).is_err());
        assert!(decode(&u32::MAX.to_le_bytes()).is_err());
    }
}
