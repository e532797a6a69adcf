//! openraft's storage conformance suite against our real stores: the node's redb Raft log and a shard's
//! redb state machine (through the same adapter the server uses).

use std::sync::Arc;

use shopkeep::engine::replica::ShardMachine;
use shopkeep::state::ShardStore;
use shopkeep_raft::log_store::{LogDb, LogStore};
use shopkeep_raft::openraft::testing::{StoreBuilder, Suite};
use shopkeep_raft::state_machine::StateMachineStore;
use shopkeep_raft::{StorageError, TypeConfig};
use tempfile::TempDir;

/// `coalescing`: the state machine holds back entries other leaders than this node proposed, as a
/// cluster's replicas do.
struct RedbStores {
    coalescing: Option<u64>,
}

type Machine = StateMachineStore<ShardMachine>;

impl StoreBuilder<TypeConfig, LogStore, Machine, TempDir> for RedbStores {
    async fn build(&self) -> Result<(TempDir, LogStore, Machine), StorageError> {
        let dir = tempfile::Builder::new()
            .prefix("shopkeep-conformance-")
            .tempdir()
            .expect("temp dir");
        let log = LogDb::open(&dir.path().join("raft-log.redb"))
            .and_then(|db| db.shard(0))
            .expect("open the log");
        let store =
            ShardStore::open(&dir.path().join("shard-000.redb"), 0).expect("open the shard");
        let machine = StateMachineStore::new(
            Arc::new(ShardMachine::new(Arc::new(store))),
            dir.path().join("snapshots"),
        )
        .expect("snapshot dir");
        let machine = match self.coalescing {
            Some(me) => machine.coalescing(me),
            None => machine,
        };
        Ok((dir, log, machine))
    }
}

#[test]
fn redb_log_and_state_machine_pass_openraft_storage_suite() {
    Suite::test_all(RedbStores { coalescing: None }).expect("openraft storage conformance suite");
}

#[test]
fn a_state_machine_holding_back_other_leaders_entries_passes_openraft_storage_suite() {
    Suite::test_all(RedbStores {
        coalescing: Some(77),
    })
    .expect("openraft storage conformance suite");
}
