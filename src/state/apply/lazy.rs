//! A table of the apply's write transaction, opened the first time a command touches it and kept open
//! while the transaction is held (`state/held.rs`), from batch to batch.
//!
//! A purchase touches about a dozen of the shard's ~30 tables; opening every one of them at each batch
//! cost more than the rows it writes at one command per batch (see `benches/apply.rs`).

use std::cell::OnceCell;

use redb::{Key, Table, TableDefinition, Value, WriteTransaction};

use crate::state::StoreError;

pub(super) struct LazyTable<'t, K: Key + 'static, V: Value + 'static> {
    txn: &'t WriteTransaction,
    definition: TableDefinition<'static, K, V>,
    table: OnceCell<Table<'t, K, V>>,
}

impl<'t, K: Key + 'static, V: Value + 'static> LazyTable<'t, K, V> {
    pub(super) fn new(
        txn: &'t WriteTransaction,
        definition: TableDefinition<'static, K, V>,
    ) -> Self {
        LazyTable {
            txn,
            definition,
            table: OnceCell::new(),
        }
    }

    /// The table to read, opened (and created in a new file) if no command of the transaction opened it yet.
    pub(super) fn read(&self) -> Result<&Table<'t, K, V>, StoreError> {
        if let Some(table) = self.table.get() {
            return Ok(table);
        }
        let table = self.txn.open_table(self.definition)?;
        Ok(self.table.get_or_init(|| table))
    }

    /// The table to write, opened if no command of the transaction opened it yet.
    pub(super) fn write(&mut self) -> Result<&mut Table<'t, K, V>, StoreError> {
        self.read()?;
        Ok(self.table.get_mut().expect("read() has just opened it"))
    }
}
