//! The cluster as an operator sees it: the view of nodes and shards, where a user lives, and membership
//! changes (add a node as a learner, promote it to voter, remove a node), applied to every shard, and
//! spreading the shards' leaders evenly over the healthy voters.

use axum::extract::State;
use axum::response::Response;

use crate::engine::MembershipChange;
use crate::http::auth::Caller;
use crate::http::dto::{
    AddNodeRequest, ClusterNode, ClusterResponse, ClusterShard, LeaderMoveResponse,
    RebalanceResponse, RouteResponse,
};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::input::{self, PathParams, Post};
use crate::http::{AppState, render};

fn view(app: &AppState) -> ClusterResponse {
    let status = app.node.cluster().status();
    let mode = if app.config.peers.is_some() || status.nodes.len() > 1 {
        "cluster"
    } else {
        "single"
    };
    ClusterResponse {
        node_id: status.node_id,
        mode: mode.to_owned(),
        nodes: status
            .nodes
            .iter()
            .map(|(id, address)| ClusterNode {
                node_id: *id,
                address: address.clone(),
                this_node: *id == status.node_id,
            })
            .collect(),
        shards: status
            .shards
            .into_iter()
            .map(|shard| ClusterShard {
                shard: shard.shard,
                role: shard.role.to_owned(),
                leader: shard.leader,
                term: shard.term,
                voters: shard.voters,
                learners: shard.learners,
                last_log_index: shard.last_log_index,
                applied_index: shard.applied_index,
                snapshot_index: shard.snapshot_index,
                snapshot_log_bytes: shard.snapshot_log_bytes,
                snapshot_at_log_bytes: shard.snapshot_at_log_bytes,
                lag: shard
                    .lag
                    .into_iter()
                    .map(|(node, lag)| (node.to_string(), lag))
                    .collect(),
                healthy: shard.leader.is_some(),
                recovery: shard.recovery.to_owned(),
            })
            .collect(),
    }
}

/// Nodes and shards as this node sees them: role, leader, term, log and applied indexes, lag (admin).
#[utoipa::path(get, path = "/v1/cluster", tag = "operations",
    responses((status = 200, description = "This node's view of the cluster", body = ClusterResponse), (status = 403, description = "`forbidden`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cluster(State(app): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_admin()?;
    Ok(render::ok(&view(&app)))
}

/// The shard that holds a user's rows and that shard's leader (admin or service). A game backend
/// that sends each player's requests to that node spares them the forward to the leader; a stale
/// answer costs only that forward.
#[utoipa::path(get, path = "/v1/cluster/route/{user_id}", tag = "operations",
    params(("user_id" = String, Path)),
    responses((status = 200, description = "The user's shard and its leader", body = RouteResponse), (status = 403, description = "`forbidden`", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn route(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(user_id): PathParams<String>,
) -> Result<Response, ApiError> {
    caller.require_staff()?;
    let user_id = input::client_id("user_id", &user_id)?;
    let shard = app.node.shard_of_user(&user_id);
    let leader = app
        .node
        .cluster()
        .status()
        .shards
        .get(shard as usize)
        .and_then(|s| s.leader);
    Ok(render::ok(&RouteResponse {
        user_id,
        shard,
        leader,
    }))
}

/// Node ids are positive: 0 names no node.
fn member_id(node_id: u64) -> Result<u64, ApiError> {
    if node_id == 0 {
        Err(ApiError::invalid_request(
            "node_id must be a positive integer",
        ))
    } else {
        Ok(node_id)
    }
}

async fn change(app: &AppState, change: MembershipChange) -> Result<Response, ApiError> {
    app.node.change_membership(change).await?;
    Ok(render::ok(&view(app)))
}

/// Add a node as a learner of every shard; answers once it has caught up (admin). Start the node first
/// with `--node-id` and `--peers`: it waits to be added.
#[utoipa::path(post, path = "/v1/admin/cluster/nodes", tag = "operations", request_body = AddNodeRequest,
    params(("Idempotency-Key" = String, Header)),
    responses(
        (status = 200, description = "The cluster after the change", body = ClusterResponse),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 409, description = "`invalid_state`: the change is not allowed now, or the node at the address is another node or splits users over another number of shards", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn add_node(
    State(app): State<AppState>,
    caller: Caller,
    post: Post,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    post.idempotency_key()?;
    let request: AddNodeRequest = post.json()?;
    member_id(request.node_id)?;
    if crate::config::parse_peers(&format!("{}={}", request.node_id, request.address)).is_err() {
        return Err(ApiError::invalid_request("address must be host:port"));
    }
    change(
        &app,
        MembershipChange::AddLearner {
            node: request.node_id,
            addr: request.address,
        },
    )
    .await
}

/// Make a learner a voter of every shard (admin).
#[utoipa::path(post, path = "/v1/admin/cluster/nodes/{node_id}/promote", tag = "operations",
    params(("node_id" = u64, Path), ("Idempotency-Key" = String, Header)),
    responses(
        (status = 200, description = "The cluster after the change", body = ClusterResponse),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 409, description = "`invalid_state`: not a learner yet", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn promote_node(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(node_id): PathParams<u64>,
    post: Post,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let node = member_id(node_id)?;
    post.idempotency_key()?;
    change(&app, MembershipChange::Promote { node }).await
}

/// Remove a node from every shard (admin). Its data is then stale: never restart it with the same id.
#[utoipa::path(delete, path = "/v1/admin/cluster/nodes/{node_id}", tag = "operations",
    params(("node_id" = u64, Path)),
    responses(
        (status = 200, description = "The cluster after the change", body = ClusterResponse),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no shard has the node as a voter or learner", body = ErrorBody),
        (status = 409, description = "`invalid_state`: e.g. the last voter", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn remove_node(
    State(app): State<AppState>,
    caller: Caller,
    PathParams(node_id): PathParams<u64>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let node = member_id(node_id)?;
    if !is_member(&app, node) {
        return Err(ApiError::node_not_found(node));
    }
    change(&app, MembershipChange::Remove { node }).await
}

/// Whether `node` is a voter or a learner of any shard, as this node sees the membership.
fn is_member(app: &AppState, node: u64) -> bool {
    app.node
        .cluster()
        .status()
        .shards
        .iter()
        .any(|shard| shard.voters.contains(&node) || shard.learners.contains(&node))
}

/// Spread the shards' leaders evenly over the healthy voters now (admin): each move asks the new leader
/// to stand for election (an election: nothing acknowledged can be lost). Leaders also spread back out
/// by themselves once an imbalance has lasted about 30 s.
#[utoipa::path(post, path = "/v1/admin/cluster/leaders/rebalance", tag = "operations",
    params(("Idempotency-Key" = String, Header)),
    responses(
        (status = 200, description = "The moves that took effect and the leaders per node after them", body = RebalanceResponse),
        (status = 403, description = "`forbidden`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn rebalance_leaders(
    State(app): State<AppState>,
    caller: Caller,
    post: Post,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    post.idempotency_key()?;
    let rebalanced = app.node.cluster().rebalance_leaders().await;
    Ok(render::ok(&RebalanceResponse {
        moved: rebalanced
            .moved
            .into_iter()
            .map(|m| LeaderMoveResponse {
                shard: m.shard,
                from: m.from,
                to: m.to,
            })
            .collect(),
        leaders: rebalanced
            .leaders
            .into_iter()
            .map(|(node, count)| (node.to_string(), count))
            .collect(),
    }))
}
