//! Seeding a shopkeep deployment (the `gems` item, [`USERS`] users with credit) and the admin reads the
//! phases need: each user's shard, each shard's leader.

use reqwest::{Client, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{ADMIN_TOKEN, SEED_PARALLELISM, SERVICE_TOKEN, USERS};

/// Creates the `gems` item and [`USERS`] users with plenty of credit. Panics on any unexpected answer.
pub(crate) async fn seed(client: &Client, base: &str) {
    let response = client
        .put(format!("{base}/v1/items/gems"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "Gems", "kind": "currency", "price": "0.01"}))
        .send()
        .await
        .expect("PUT /v1/items/gems: request failed");
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "PUT /v1/items/gems: {body}");

    let mut tasks = Vec::new();
    for worker in 0..SEED_PARALLELISM {
        let client = client.clone();
        let base = base.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (worker..USERS).step_by(SEED_PARALLELISM) {
                let user = user_id(i);
                service_post(
                    &client,
                    &format!("{base}/v1/users"),
                    json!({"user_id": user}),
                    StatusCode::CREATED,
                )
                .await;
                service_post(
                    &client,
                    &format!("{base}/v1/users/{user}/credits"),
                    json!({"amount": "100000.00", "external_ref": format!("bench-{i}")}),
                    StatusCode::CREATED,
                )
                .await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("a seeding task panicked");
    }
}

/// A service-role POST with a fresh idempotency key that must answer `expected`.
async fn service_post(client: &Client, url: &str, body: Value, expected: StatusCode) {
    let response = client
        .post(url)
        .bearer_auth(SERVICE_TOKEN)
        .header("Idempotency-Key", Uuid::now_v7().to_string())
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: request failed: {e}"));
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, expected, "POST {url} {body}: {text}");
}

pub(crate) fn user_id(i: usize) -> String {
    format!("bench-{i}")
}

/// An admin GET that must answer 200 with JSON. Panics otherwise.
async fn admin_get<T: serde::de::DeserializeOwned>(client: &Client, url: &str) -> T {
    let response = client
        .get(url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: request failed: {e}"));
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "GET {url}: {text}");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("GET {url}: unexpected body ({e}): {text}"))
}

#[derive(Deserialize)]
struct Route {
    shard: u32,
}

/// The shard of every bench user (`GET /v1/cluster/route/{id}`), indexed like [`user_id`].
pub(crate) async fn user_shards(client: &Client, base: &str) -> Vec<u32> {
    let mut tasks = Vec::new();
    for worker in 0..SEED_PARALLELISM {
        let client = client.clone();
        let base = base.to_string();
        tasks.push(tokio::spawn(async move {
            let mut shards = Vec::new();
            for i in (worker..USERS).step_by(SEED_PARALLELISM) {
                let url = format!("{base}/v1/cluster/route/{}", user_id(i));
                let route: Route = admin_get(&client, &url).await;
                shards.push((i, route.shard));
            }
            shards
        }));
    }
    let mut shards = vec![0; USERS];
    for task in tasks {
        for (i, shard) in task.await.expect("a routing task panicked") {
            shards[i] = shard;
        }
    }
    shards
}

#[derive(Deserialize)]
struct ClusterView {
    shards: Vec<ClusterShard>,
}

#[derive(Deserialize)]
struct ClusterShard {
    leader: Option<u64>,
}

/// Each shard's leader as `base` sees it (`GET /v1/cluster`), indexed by shard.
pub(crate) async fn shard_leaders(client: &Client, base: &str) -> Vec<Option<u64>> {
    let view: ClusterView = admin_get(client, &format!("{base}/v1/cluster")).await;
    view.shards.into_iter().map(|s| s.leader).collect()
}

pub(crate) fn leaders_text(leaders: &[Option<u64>]) -> String {
    let parts: Vec<String> = leaders
        .iter()
        .map(|l| l.map_or("-".to_string(), |id| id.to_string()))
        .collect();
    format!("[{}]", parts.join(","))
}
