//! Reversals on a 3-node cluster: the user's shard leader is SIGKILLed while reversals and PSP refunds
//! are in flight; every one is retried with its key until it has a definite answer, and each is taken
//! exactly once, with the same wallet, debt and freeze on every surviving replica and the restarted one.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster_harness::*;
use crate::harness::*;

const CONVERGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reversals_in_flight_when_the_shard_leader_is_killed_are_each_taken_exactly_once() {
    let mut c = TestCluster::start(3).await;
    let user = uniq("rvk");
    let api = c.api(1);
    api.create_item("sword", "skin", "80.00").await;
    api.create_user(&user).await;
    let credit = api.credit(&user, "100.00").await;
    api.order(&user, &[("sword", 1)], true).await;
    let topup = api.topup(&user, "10.00").await;
    let paid = json!({"event_id": uniq("pay"), "type": "payment.succeeded",
        "topup_id": topup["topup_id"], "user_id": user, "amount": "10.00",
        "psp_payment_id": uniq("pi")});
    api.webhook(&paid).await.expect(200);
    // Wallet: 100 + 10 - 80 = 30 available.

    let (shard, _) = c.route(&user).await;
    let leader = c.leader_of_shard(shard).await;
    let live: Vec<u64> = c.ids().into_iter().filter(|&i| i != leader).collect();
    let path = format!(
        "/v1/users/{user}/credits/{}/reversals",
        credit["credit_id"].as_str().unwrap()
    );

    // 20 reversals of 5.00 (the whole credit) through the survivors, with 5 PSP refunds of 2.00 (the
    // whole top-up), while the leader dies.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let node = c.api(live[i % live.len()]);
        let path = path.clone();
        let body =
            json!({"amount": "5.00", "reason": "chargeback", "external_ref": format!("cb-{i}")});
        tasks.push(tokio::spawn(async move {
            let key = new_key();
            post_until_definite(&node, &path, &key, &body, Duration::from_secs(60)).await
        }));
    }
    let mut refunds = Vec::new();
    for i in 0..5 {
        let node = c.api(live[i % live.len()]);
        let event = json!({"event_id": format!("rf-{user}-{i}"), "type": "payment.refunded",
            "topup_id": topup["topup_id"], "user_id": user, "amount": "2.00"});
        refunds.push(tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let body = serde_json::to_vec(&event).unwrap();
                let signature = sign_webhook(PSP_SECRET, now_unix(), &body);
                let call = node
                    .call(reqwest::Method::POST, "/v1/psp/webhook")
                    .raw(body)
                    .header("psp-signature", &signature);
                match tokio::time::timeout(Duration::from_secs(10), call.try_send()).await {
                    Ok(Ok(r)) if r.status < 500 => return r,
                    _ if tokio::time::Instant::now() > deadline => {
                        panic!("refund {i} never got a definite answer")
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    c.kill9(leader);

    let mut ids = std::collections::BTreeSet::new();
    for task in tasks {
        let answer = task.await.expect("reversal task");
        let reversal = if answer.status == 200 {
            answer.json()
        } else {
            answer.expect(201)
        };
        assert_eq!(reversal["amount"], "5.00");
        ids.insert(reversal["reversal_id"].as_str().unwrap().to_owned());
    }
    for task in refunds {
        let answer = task.await.expect("refund task");
        let reversal = answer.expect(201);
        ids.insert(reversal["reversal_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 25, "each reversal is its own, taken once");

    // 110 taken back from 30 available: 80 of debt, balance 0, frozen — on every replica.
    c.wait_converged_among(&live, CONVERGE).await;
    for &id in &live {
        let wallet = c
            .api(id)
            .get(
                &format!("/v1/users/{user}/wallet?consistency=local"),
                Auth::Service,
            )
            .await
            .expect(200);
        assert_eq!(wallet["balance"], "0.00", "node {id}");
        assert_eq!(wallet["debt"], "80.00", "node {id}");
    }
    let user_view: Value = c
        .api(live[0])
        .get(&format!("/v1/users/{user}"), Auth::Service)
        .await
        .expect(200);
    assert_eq!(user_view["frozen"]["reason"], "debt_outstanding");
    let over = json!({"amount": "0.01", "reason": "chargeback", "external_ref": "one-more"});
    c.api(live[0])
        .post(&path, Auth::Service, &over)
        .await
        .expect_error(409, "reversal_exceeds_credit");

    c.restart(leader).await;
    c.wait_ready(&[leader], READY_TIMEOUT).await;
    c.wait_converged(CONVERGE).await;
    let back = c.node(leader).local_wallet(&user).await;
    assert_eq!((back.balance, back.held), (0, 0));
}
