//! A shard's whole state as a byte stream (the body of a Raft snapshot), and back.
//!
//! Format: for every table in `tables::visit_all` order, each row as
//! `tag (u8) | key length (u32 LE) | key | value length (u32 LE) | value`, then `END`. Rows are the
//! tables' raw redb encodings, so a snapshot is exactly the file's content, whatever the row types.
//! An import replaces every table in ONE durable transaction: a crash leaves the old state or the new.

use std::io::{Read, Write};

use redb::{Key, ReadTransaction, TableDefinition, Value, WriteTransaction};
use shopkeep_faults::failpoints;

use super::audit::{self, StateHasher};
use super::query;
use super::tables::{self, TableVisitor};
use super::{SCHEMA_VERSION, ShardStore, StoreError};

const END: u8 = 0xFF;
/// The largest key or value a snapshot may carry (a real row is far smaller).
const MAX_FIELD: u32 = 16 * 1024 * 1024;

fn io(e: std::io::Error) -> StoreError {
    StoreError::SnapshotStream(e)
}

/// Writes every row of the state `txn` sees to `out`.
pub fn export(txn: &ReadTransaction, out: &mut dyn Write) -> Result<(), StoreError> {
    tables::visit_all(&mut Exporter { txn, out })?;
    out.write_all(&[END]).map_err(io)
}

struct Exporter<'a> {
    txn: &'a ReadTransaction,
    out: &'a mut dyn Write,
}

impl TableVisitor for Exporter<'_> {
    fn visit<K: Key + 'static, V: Value + 'static>(
        &mut self,
        tag: u8,
        definition: TableDefinition<'static, K, V>,
    ) -> Result<(), StoreError> {
        let out = &mut self.out;
        tables::for_each_raw_row(self.txn, definition, |key, value| {
            out.write_all(&[tag]).map_err(io)?;
            for field in [key, value] {
                let len = u32::try_from(field.len())
                    .map_err(|_| StoreError::Encode("row too large for a snapshot".into()))?;
                out.write_all(&len.to_le_bytes()).map_err(io)?;
                out.write_all(field).map_err(io)?;
            }
            Ok(())
        })?;
        Ok(())
    }
}

/// One row's raw key and value.
type Row = (Vec<u8>, Vec<u8>);

/// Reads rows, one tag of look-ahead.
struct Rows<'a> {
    input: &'a mut dyn Read,
    next_tag: Option<u8>,
}

impl Rows<'_> {
    fn peek(&mut self) -> Result<u8, StoreError> {
        if let Some(tag) = self.next_tag {
            return Ok(tag);
        }
        let mut tag = [0u8; 1];
        self.input.read_exact(&mut tag).map_err(io)?;
        self.next_tag = Some(tag[0]);
        Ok(tag[0])
    }

    fn field(&mut self) -> Result<Vec<u8>, StoreError> {
        let mut len = [0u8; 4];
        self.input.read_exact(&mut len).map_err(io)?;
        let len = u32::from_le_bytes(len);
        if len > MAX_FIELD {
            return Err(StoreError::Corrupt(format!(
                "snapshot field of {len} bytes"
            )));
        }
        let mut field = vec![0u8; len as usize];
        self.input.read_exact(&mut field).map_err(io)?;
        Ok(field)
    }

    /// The next row if it belongs to the table `tag`.
    fn next_of(&mut self, tag: u8) -> Result<Option<Row>, StoreError> {
        if self.peek()? != tag {
            return Ok(None);
        }
        self.next_tag = None;
        Ok(Some((self.field()?, self.field()?)))
    }
}

/// What an exported stream holds, recomputed from its bytes alone (no file is written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// The `state_hash` of the state the stream was exported from.
    pub state_hash: String,
    pub rows: u64,
}

/// Reads a whole exported stream and recomputes the `state_hash` of the state it was exported from:
/// memory stays at one row whatever the size. Fails on a stream that is cut short, has rows of an
/// unknown or out-of-order table, or trailing bytes.
pub fn hash_export(input: &mut dyn Read) -> Result<ExportSummary, StoreError> {
    let mut hashing = StreamHashing {
        rows: Rows {
            input,
            next_tag: None,
        },
        hasher: StateHasher::default(),
        count: 0,
    };
    tables::visit_all(&mut hashing)?;
    let last = hashing.rows.peek()?;
    if last != END {
        return Err(StoreError::Corrupt(format!(
            "exported row of unknown or out-of-order table {last}"
        )));
    }
    let mut trailing = [0u8; 1];
    if hashing.rows.input.read(&mut trailing).map_err(io)? != 0 {
        return Err(StoreError::Corrupt(
            "bytes after the end of the export".into(),
        ));
    }
    Ok(ExportSummary {
        state_hash: hashing.hasher.finish(),
        rows: hashing.count,
    })
}

struct StreamHashing<'a> {
    rows: Rows<'a>,
    hasher: StateHasher,
    count: u64,
}

impl TableVisitor for StreamHashing<'_> {
    fn visit<K: Key + 'static, V: Value + 'static>(
        &mut self,
        tag: u8,
        definition: TableDefinition<'static, K, V>,
    ) -> Result<(), StoreError> {
        self.hasher.table(&definition.to_string());
        while let Some((key, value)) = self.rows.next_of(tag)? {
            self.hasher.row(&key, &value);
            self.count += 1;
        }
        Ok(())
    }
}

/// Where an export stands: read in the same snapshot as the rows it describes.
#[derive(Debug, Clone)]
pub struct ExportHead {
    /// The last command applied (the Raft log index).
    pub last_applied: u64,
    /// The replication marker stored with the state (empty when nothing was applied).
    pub marker: Vec<u8>,
    pub state_hash: String,
}

/// The head of an export of the state `txn` sees (one full read, for the hash).
pub fn export_head(txn: &ReadTransaction) -> Result<ExportHead, StoreError> {
    Ok(ExportHead {
        last_applied: query::meta(txn)?.last_applied,
        marker: query::marker(txn)?.unwrap_or_default(),
        state_hash: audit::state_hash(txn)?,
    })
}

struct Importer<'a> {
    txn: &'a WriteTransaction,
    rows: Rows<'a>,
}

impl TableVisitor for Importer<'_> {
    fn visit<K: Key + 'static, V: Value + 'static>(
        &mut self,
        tag: u8,
        definition: TableDefinition<'static, K, V>,
    ) -> Result<(), StoreError> {
        let mut table = self.txn.open_table(definition)?;
        table.retain(|_, _| false)?;
        while let Some((key, value)) = self.rows.next_of(tag)? {
            table.insert(K::from_bytes(&key), V::from_bytes(&value))?;
        }
        if tag == tables::HALFWAY_TAG {
            failpoints::crash_point(failpoints::MID_SNAPSHOT_INSTALL);
        }
        Ok(())
    }
}

impl ShardStore {
    /// Makes the state durable, then returns a read view of it to export (see `sync`).
    pub fn durable_view(&self) -> Result<ReadTransaction, StoreError> {
        // The view is taken first: everything it sees was committed before the durable commit below,
        // so all of it is durable once `sync` returns.
        let view = self.begin_read()?;
        self.sync()?;
        Ok(view)
    }

    /// Replaces the whole state by an exported one and `marker`, in one durable transaction.
    pub fn import(&self, body: &mut dyn Read, marker: &[u8]) -> Result<(), StoreError> {
        self.checked(self.import_once(body, marker))?;
        self.caught_up();
        Ok(())
    }

    fn import_once(&self, body: &mut dyn Read, marker: &[u8]) -> Result<(), StoreError> {
        let mut txn = self.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| StoreError::Redb(e.into()))?;
        {
            let mut importer = Importer {
                txn: &txn,
                rows: Rows {
                    input: body,
                    next_tag: None,
                },
            };
            tables::visit_all(&mut importer)?;
            let last = importer.rows.peek()?;
            if last != END {
                return Err(StoreError::Corrupt(format!(
                    "snapshot row of unknown or out-of-order table {last}"
                )));
            }
            super::migrate::to_current(&txn)?;
            let mut meta_table = txn.open_table(tables::META)?;
            let meta: super::MetaState =
                tables::get(&meta_table, tables::META_STATE_KEY)?.unwrap_or_default();
            if meta.schema_version != SCHEMA_VERSION || meta.shard != self.shard() {
                return Err(StoreError::Incompatible(format!(
                    "snapshot of shard {} schema {}, this is shard {} schema {SCHEMA_VERSION}",
                    meta.shard,
                    meta.schema_version,
                    self.shard()
                )));
            }
            meta_table.insert(tables::MARKER_KEY, marker)?;
        }
        txn.commit()?;
        debug_assert_eq!(
            self.marker().ok().flatten().as_deref(),
            Some(marker).filter(|m| !m.is_empty())
        );
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard file with a few raw rows in two tables (the hash does not care what they mean).
    fn store_with_rows(dir: &std::path::Path) -> ShardStore {
        let store = ShardStore::open(&dir.join("shard-000.redb"), 0).expect("opens");
        let txn = store.begin_write().expect("writes");
        {
            let mut items = txn.open_table(tables::ITEMS).expect("items");
            for id in ["alice", "bob", "carol"] {
                items
                    .insert(id, format!("row of {id}").as_bytes())
                    .expect("inserts");
            }
            let mut postings = txn.open_table(tables::POSTINGS).expect("postings");
            postings
                .insert(7u64, b"a posting".as_slice())
                .expect("inserts");
            let mut meta = txn.open_table(tables::META).expect("meta");
            meta.insert(tables::MARKER_KEY, MARKER).expect("inserts");
        }
        txn.commit().expect("commits");
        store
    }

    const MARKER: &[u8] = b"the replication marker";

    fn exported(store: &ShardStore) -> (Vec<u8>, String) {
        let txn = store.begin_read().expect("reads");
        let mut bytes = Vec::new();
        export(&txn, &mut bytes).expect("exports");
        (bytes, audit::state_hash(&txn).expect("hashes"))
    }

    #[test]
    fn an_export_hashes_to_the_state_hash_of_the_file_it_came_from() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (bytes, state_hash) = exported(&store_with_rows(dir.path()));
        let summary = hash_export(&mut bytes.as_slice()).expect("a whole export");
        assert_eq!(summary.state_hash, state_hash);
        // the rows written, the shard's META state and the marker
        assert_eq!(summary.rows, 6);
    }

    #[test]
    fn a_changed_cut_or_extended_export_does_not_pass_for_the_original() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (bytes, state_hash) = exported(&store_with_rows(dir.path()));
        let row = bytes
            .windows(b"row of bob".len())
            .position(|w| w == b"row of bob")
            .expect("the row is in the export");
        let mut changed = bytes.clone();
        changed[row + 7] = b'B';
        let summary = hash_export(&mut changed.as_slice()).expect("still well-formed");
        assert_ne!(summary.state_hash, state_hash);
        let cut = &bytes[..bytes.len() - 3];
        assert!(hash_export(&mut &cut[..]).is_err());
        let mut extended = bytes.clone();
        extended.push(0);
        assert!(hash_export(&mut extended.as_slice()).is_err());
    }

    #[test]
    fn an_imported_export_has_the_state_hash_of_the_original() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (bytes, state_hash) = exported(&store_with_rows(dir.path()));
        let copy_dir = tempfile::tempdir().expect("a temporary directory");
        let copy = ShardStore::open(&copy_dir.path().join("shard-000.redb"), 0).expect("opens");
        copy.import(&mut bytes.as_slice(), MARKER).expect("imports");
        let txn = copy.begin_read().expect("reads");
        assert_eq!(audit::state_hash(&txn).expect("hashes"), state_hash);
    }
}
