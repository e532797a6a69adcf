//! The names and descriptions of the metrics this crate records (the application installs the
//! exporter and serves them; see its `metrics` module). Every name recorded here is listed here.

/// Operations (appends, votes, purges) of all shards written in one commit of the log file.
pub const LOG_OPS_PER_COMMIT: &str = "shopkeep_raft_log_ops_per_commit";
/// Commits of the log file written by the appending task itself, the writer thread being idle (the
/// others are the writer's group commits).
pub const LOG_INLINE_COMMITS: &str = "shopkeep_raft_log_inline_commits_total";
/// Appends a shard's leader acknowledged to openraft before they were durable (its own entries).
pub const LOG_EARLY_ACKS: &str = "shopkeep_raft_log_early_acks_total";
/// Time of one commit of the log file (its fsync included).
pub const LOG_COMMIT_SECONDS: &str = "shopkeep_raft_log_commit_seconds";
/// On a shard's leader: from proposing an entry to its applied reply.
pub const PROPOSAL_SECONDS: &str = "shopkeep_raft_proposal_seconds";
/// Commands proposed together in one log entry.
pub const BATCH_COMMANDS: &str = "shopkeep_raft_batch_commands";
/// From proposing a batch (forwarding to the leader included) to its replies.
pub const BATCH_SECONDS: &str = "shopkeep_raft_batch_seconds";

/// On the caller: one call to another node, from sending it to its decoded answer (labels `call`, the
/// [`crate::rpc::NodeRequest::kind`], and `peer`, the node's id).
pub const NODE_CALL_SECONDS: &str = "shopkeep_node_call_seconds";
/// On the callee: answering one call from another node, after its authentication (label `call`).
/// What a call takes beyond this is the transport: both HTTP stacks, the network, the task hops.
pub const NODE_SERVE_SECONDS: &str = "shopkeep_node_serve_seconds";

/// Node streams open (label `direction`: `out`, opened by this node; `in`, accepted from a peer).
pub const NODE_STREAMS: &str = "shopkeep_node_streams";

/// Log entries applied to a shard's state in one transaction (a follower holds other leaders' entries
/// back and applies them together, see `state_machine::coalesce`).
pub const APPLY_ENTRIES: &str = "shopkeep_raft_apply_entries";

/// Histograms of counts (operations, commands, entries).
pub const SIZES: [&str; 3] = [LOG_OPS_PER_COMMIT, BATCH_COMMANDS, APPLY_ENTRIES];

/// Gives every metric of this crate its `# HELP` line and registers each (so it is served before it
/// first fires). Call once, after the recorder is installed.
pub fn describe() {
    let histograms = [
        (
            LOG_OPS_PER_COMMIT,
            "Operations of all shards (appends, votes, purges) written by one commit of the Raft log file",
        ),
        (
            LOG_COMMIT_SECONDS,
            "Time of one commit of the Raft log file, its fsync included",
        ),
        (
            PROPOSAL_SECONDS,
            "On a shard's leader: time from proposing an entry to its applied reply (append, replication, commit, apply)",
        ),
        (
            BATCH_COMMANDS,
            "Commands proposed together as one log entry",
        ),
        (
            APPLY_ENTRIES,
            "Log entries applied to a shard's state in one transaction (a follower applies other leaders' entries together)",
        ),
        (
            BATCH_SECONDS,
            "Time from proposing a batch of commands (forwarding to the leader included) to its replies",
        ),
    ];
    for (name, help) in histograms {
        metrics::describe_histogram!(name, help);
        // Registered, it is served (empty) from now on.
        let _registered = metrics::histogram!(name);
    }
    metrics::describe_counter!(
        LOG_INLINE_COMMITS,
        "Commits of the Raft log file written by the appending task itself while the log writer was idle (light load); the rest are the writer's group commits"
    );
    metrics::counter!(LOG_INLINE_COMMITS).increment(0);
    metrics::describe_counter!(
        LOG_EARLY_ACKS,
        "Appends of a shard's leader's own entries acknowledged to openraft before they were durable, so that they are replicated while the log's fsync runs (applied only once durable)"
    );
    metrics::counter!(LOG_EARLY_ACKS).increment(0);
    metrics::describe_gauge!(
        NODE_STREAMS,
        "Node streams open, by direction: out (opened by this node to a peer) and in (accepted from a peer); each carries that pair's appends, heartbeats, votes, forwarded writes and read indexes"
    );
    for direction in ["out", "in"] {
        metrics::gauge!(NODE_STREAMS, "direction" => direction).set(0.0);
    }
    // Labelled: served once a call was made.
    metrics::describe_histogram!(
        NODE_CALL_SECONDS,
        "On the caller: time of one call to another node, from sending it to its decoded answer, by kind of call and peer"
    );
    metrics::describe_histogram!(
        NODE_SERVE_SECONDS,
        "On the callee: time answering one call from another node, by kind of call (the rest of the call's time is transport)"
    );
}
