//! Limits: shop-wide and per-user, what each one counts, when it frees up (`retry_after`), who may set
//! them, what a bad body does, and that they survive a restart.

use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::cluster_harness::TestCluster;
use crate::harness::*;

async fn put_shop(srv: &Server, body: &Value) -> Resp {
    srv.put("/v1/admin/limits", Auth::Admin, body).await
}

async fn put_user(srv: &Server, user: &str, body: &Value) -> Resp {
    srv.put(&format!("/v1/users/{user}/limits"), Auth::Admin, body)
        .await
}

async fn get_user(srv: &Server, user: &str) -> Value {
    srv.get(&format!("/v1/users/{user}/limits"), Auth::Service)
        .await
        .expect(200)
}

async fn topup(srv: &Server, user: &str) -> Resp {
    srv.post(
        &format!("/v1/users/{user}/topups"),
        Auth::Service,
        &json!({"amount": "5.00"}),
    )
    .await
}

fn next_hour(t: OffsetDateTime) -> OffsetDateTime {
    let start = t
        .replace_minute(0)
        .and_then(|t| t.replace_second(0))
        .and_then(|t| t.replace_nanosecond(0))
        .unwrap();
    start + time::Duration::hours(1)
}

fn next_midnight(t: OffsetDateTime) -> OffsetDateTime {
    t.date().next_day().unwrap().midnight().assume_utc()
}

/// Waits out the last seconds of a UTC hour (or day), so that a test counting within one window does
/// not see it change midway.
async fn away_from_boundary(next: fn(OffsetDateTime) -> OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    let left = next(now) - now;
    if left < time::Duration::seconds(30) {
        tokio::time::sleep(Duration::from_secs_f64(left.as_seconds_f64() + 1.0)).await;
    }
}

/// Checks that a refusal's `retry_after` is `next` of the request's time (the command's time is between
/// `before` and `after`).
#[track_caller]
fn assert_retry_after(
    details: &Value,
    before: OffsetDateTime,
    after: OffsetDateTime,
    next: impl Fn(OffsetDateTime) -> OffsetDateTime,
) {
    let at = ts(&details["retry_after"]);
    assert!(
        at == next(before) || at == next(after),
        "retry_after {at} is not {} (or {})",
        next(before),
        next(after)
    );
}

#[tokio::test]
async fn orders_per_hour_allows_exactly_the_limit_and_refuses_the_next_with_retry_after_the_next_hour()
 {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("lo1", "50.00").await;
    away_from_boundary(next_hour).await;
    let shop = put_shop(&srv, &json!({"max_orders_per_hour": 3}))
        .await
        .expect(200);
    assert_eq!(shop["limits"]["max_orders_per_hour"], 3);
    assert_eq!(shop["settings"]["max_orders_per_hour"], 3);

    srv.order("lo1", &[("gems", 1)], true).await;
    srv.order("lo1", &[("gems", 1)], false).await;
    srv.order("lo1", &[("gems", 1)], true).await;
    let before = OffsetDateTime::now_utc();
    let refused = srv
        .create_order("lo1", &[("gems", 1)], true)
        .await
        .expect_error(409, "limit_exceeded");
    let after = OffsetDateTime::now_utc();
    assert_eq!(refused["details"]["limit"], "max_orders_per_hour");
    assert_eq!(refused["details"]["max"], 3);
    assert_retry_after(&refused["details"], before, after, next_hour);

    let metrics = srv.get("/metrics", Auth::None).await.text();
    for (limit, refusals) in [("max_orders_per_hour", 1), ("max_spend_per_day", 0)] {
        let line = format!("shopkeep_limit_exceeded_total{{limit=\"{limit}\"}} {refusals}");
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in:\n{metrics}"
        );
    }

    let limits = get_user(&srv, "lo1").await;
    assert_eq!(limits["usage"]["orders_this_hour"], 3);
    assert_eq!(limits["limits"]["max_orders_per_hour"], 3);
    assert_eq!(limits["overrides"]["max_orders_per_hour"], "default");
    // Another user has their own count.
    srv.funded_user("lo2", "5.00").await;
    srv.order("lo2", &[("gems", 1)], true).await;
    srv.audit_ok().await;
}

#[tokio::test]
async fn spend_per_day_allows_reaching_the_limit_exactly_refuses_one_cent_more_and_is_checked_again_at_completion()
 {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.create_item("cent", "currency", "0.01").await;
    srv.funded_user("ls1", "100.00").await;
    away_from_boundary(next_midnight).await;
    let user = put_user(&srv, "ls1", &json!({"max_spend_per_day": "10.00"}))
        .await
        .expect(200);
    assert_eq!(user["limits"]["max_spend_per_day"], "10.00");
    assert_eq!(user["overrides"]["max_spend_per_day"], "10.00");

    srv.order("ls1", &[("gems", 9)], true).await;
    srv.order("ls1", &[("cent", 100)], true).await;
    assert_eq!(get_user(&srv, "ls1").await["usage"]["spent_today"], "10.00");
    let before = OffsetDateTime::now_utc();
    let refused = srv
        .create_order("ls1", &[("cent", 1)], true)
        .await
        .expect_error(409, "limit_exceeded");
    let after = OffsetDateTime::now_utc();
    assert_eq!(refused["details"]["limit"], "max_spend_per_day");
    assert_eq!(refused["details"]["max"], "10.00");
    assert_retry_after(&refused["details"], before, after, next_midnight);
    // A pending order must fit too.
    srv.create_order("ls1", &[("cent", 1)], false)
        .await
        .expect_error(409, "limit_exceeded");

    // Raised to 12.00: a pending order of 2.00 fits now, but not any more once 1.00 more was spent.
    put_user(&srv, "ls1", &json!({"max_spend_per_day": "12.00"}))
        .await
        .expect(200);
    let pending = srv.order("ls1", &[("gems", 2)], false).await;
    srv.order("ls1", &[("gems", 1)], true).await;
    let refused = srv
        .complete_order("ls1", pending["order_id"].as_str().unwrap(), Auth::Service)
        .await
        .expect_error(409, "limit_exceeded");
    assert_eq!(refused["details"]["max"], "12.00");
    let limits = get_user(&srv, "ls1").await;
    assert_eq!(limits["usage"]["spent_today"], "11.00", "nothing debited");
    assert!(limits["usage"]["orders_this_hour"].as_u64().unwrap() >= 4);
    srv.audit_ok().await;
}

#[tokio::test]
async fn refunds_per_30_days_refuse_the_one_beyond_the_limit_but_never_an_admins_forced_refund() {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("lr1", "20.00").await;
    away_from_boundary(next_midnight).await;
    put_user(&srv, "lr1", &json!({"max_refunds_per_30_days": 2}))
        .await
        .expect(200);
    let order = srv.order("lr1", &[("gems", 5)], true).await;
    let order_id = order["order_id"].as_str().unwrap();
    let one = json!({"lines": [{"item_id": "gems", "quantity": 1}]});
    srv.refund("lr1", order_id, Auth::Service, &one)
        .await
        .expect(201);
    srv.refund("lr1", order_id, Auth::Service, &one)
        .await
        .expect(201);
    let before = OffsetDateTime::now_utc();
    let refused = srv
        .refund("lr1", order_id, Auth::Admin, &one)
        .await
        .expect_error(409, "limit_exceeded");
    let after = OffsetDateTime::now_utc();
    assert_eq!(refused["details"]["limit"], "max_refunds_per_30_days");
    assert_eq!(refused["details"]["max"], 2);
    // Both refunds were today: the limit frees up when today leaves the 30-day window.
    assert_retry_after(&refused["details"], before, after, |t| {
        next_midnight(t) + time::Duration::days(29)
    });

    let forced = json!({"lines": [{"item_id": "gems", "quantity": 1}], "force": true});
    srv.refund("lr1", order_id, Auth::Admin, &forced)
        .await
        .expect(201);
    assert_eq!(
        get_user(&srv, "lr1").await["usage"]["refunds_last_30_days"],
        3,
        "the forced refund counts"
    );
    srv.refund("lr1", order_id, Auth::Service, &one)
        .await
        .expect_error(409, "limit_exceeded");
    srv.audit_ok().await;
}

#[tokio::test]
async fn pending_topups_set_shop_wide_override_the_flag_a_user_override_wins_default_drops_it_and_null_removes_the_limit()
 {
    let srv = Server::start().await;
    srv.create_user("lt1").await;
    let shop = srv.get("/v1/admin/limits", Auth::Admin).await.expect(200);
    assert_eq!(
        shop["limits"]["max_pending_topups"], 10,
        "the flag's default"
    );
    assert_eq!(shop["settings"]["max_pending_topups"], "default");

    put_shop(&srv, &json!({"max_pending_topups": 2}))
        .await
        .expect(200);
    topup(&srv, "lt1").await.expect(201);
    topup(&srv, "lt1").await.expect(201);
    let refused = topup(&srv, "lt1").await.expect_error(409, "limit_exceeded");
    assert_eq!(refused["details"]["limit"], "max_pending_topups");
    assert_eq!(refused["details"]["max"], 2);
    ts(&refused["details"]["retry_after"]);

    let user = put_user(&srv, "lt1", &json!({"max_pending_topups": 3}))
        .await
        .expect(200);
    assert_eq!(user["limits"]["max_pending_topups"], 3);
    assert_eq!(user["usage"]["pending_topups"], 2);
    topup(&srv, "lt1").await.expect(201);
    let refused = topup(&srv, "lt1").await.expect_error(409, "limit_exceeded");
    assert_eq!(refused["details"]["max"], 3);

    let user = put_user(&srv, "lt1", &json!({"max_pending_topups": "default"}))
        .await
        .expect(200);
    assert_eq!(user["overrides"]["max_pending_topups"], "default");
    assert_eq!(user["limits"]["max_pending_topups"], 2, "the shop's again");

    let user = put_user(&srv, "lt1", &json!({"max_pending_topups": null}))
        .await
        .expect(200);
    assert_eq!(user["overrides"]["max_pending_topups"], Value::Null);
    assert_eq!(user["limits"]["max_pending_topups"], Value::Null);
    topup(&srv, "lt1").await.expect(201);

    // The shop back to the built-in default; a shop-wide null is no limit for everyone.
    let shop = put_shop(&srv, &json!({"max_pending_topups": "default"}))
        .await
        .expect(200);
    assert_eq!(shop["limits"]["max_pending_topups"], 10);
    put_shop(&srv, &json!({"max_pending_topups": null}))
        .await
        .expect(200);
    srv.create_user("lt2").await;
    for _ in 0..11 {
        topup(&srv, "lt2").await.expect(201);
    }
    let shop = srv.get("/v1/admin/limits", Auth::Admin).await.expect(200);
    assert_eq!(shop["limits"]["max_pending_topups"], Value::Null);
}

#[tokio::test]
async fn get_shows_the_limits_in_force_and_unknown_users_non_admins_and_bad_bodies_are_refused_without_a_change()
 {
    let srv = Server::start().await;
    srv.create_user("lg1").await;
    let shop = srv.get("/v1/admin/limits", Auth::Admin).await.expect(200);
    assert_eq!(
        shop,
        json!({
            "limits": {"max_spend_per_day": null, "max_orders_per_hour": null,
                "max_pending_topups": 10, "max_refunds_per_30_days": null},
            "settings": {"max_spend_per_day": "default", "max_orders_per_hour": "default",
                "max_pending_topups": "default", "max_refunds_per_30_days": "default"},
        })
    );
    put_shop(
        &srv,
        &json!({"max_spend_per_day": "200.00", "max_refunds_per_30_days": 5}),
    )
    .await
    .expect(200);
    put_user(
        &srv,
        "lg1",
        &json!({"max_refunds_per_30_days": null, "max_orders_per_hour": 0}),
    )
    .await
    .expect(200);
    let user = get_user(&srv, "lg1").await;
    assert_eq!(user["user_id"], "lg1");
    assert_eq!(
        user["limits"],
        json!({"max_spend_per_day": "200.00", "max_orders_per_hour": 0,
            "max_pending_topups": 10, "max_refunds_per_30_days": null})
    );
    assert_eq!(
        user["overrides"],
        json!({"max_spend_per_day": "default", "max_orders_per_hour": 0,
            "max_pending_topups": "default", "max_refunds_per_30_days": null})
    );
    assert_eq!(
        user["usage"],
        json!({"spent_today": "0.00", "orders_this_hour": 0, "refunds_last_30_days": 0,
            "pending_topups": 0})
    );

    srv.get("/v1/users/nobody/limits", Auth::Service)
        .await
        .expect_error(404, "user_not_found");
    put_user(&srv, "nobody", &json!({"max_orders_per_hour": 1}))
        .await
        .expect_error(404, "user_not_found");
    srv.put("/v1/admin/limits", Auth::Service, &json!({}))
        .await
        .expect_error(403, "forbidden");
    srv.get("/v1/admin/limits", Auth::Service)
        .await
        .expect_error(403, "forbidden");
    srv.put("/v1/users/lg1/limits", Auth::Service, &json!({}))
        .await
        .expect_error(403, "forbidden");
    let token = srv.user_token("lg1").await;
    srv.get("/v1/users/lg1/limits", Auth::user(&token))
        .await
        .expect_error(403, "forbidden");

    let bad_requests = [
        json!({"max_orders_per_minute": 1}),
        json!({"max_orders_per_hour": -1}),
        json!({"max_orders_per_hour": 1_000_001}),
        json!({"max_orders_per_hour": 1.5}),
        json!({"max_orders_per_hour": "5"}),
        json!({"max_pending_topups": true}),
        json!([1]),
    ];
    for body in &bad_requests {
        put_shop(&srv, body)
            .await
            .expect_error(400, "invalid_request");
        put_user(&srv, "lg1", body)
            .await
            .expect_error(400, "invalid_request");
    }
    let bad_amounts = [
        json!({"max_spend_per_day": 200}),
        json!({"max_spend_per_day": "-1.00"}),
        json!({"max_spend_per_day": "1.001"}),
        json!({"max_spend_per_day": "1000000.01"}),
        json!({"max_spend_per_day": "Default"}),
    ];
    for body in &bad_amounts {
        put_shop(&srv, body)
            .await
            .expect_error(422, "invalid_amount");
        put_user(&srv, "lg1", body)
            .await
            .expect_error(422, "invalid_amount");
    }
    // A bad field next to a good one: nothing of the body is written.
    put_user(
        &srv,
        "lg1",
        &json!({"max_pending_topups": 1, "max_orders_per_hour": -1}),
    )
    .await
    .expect_error(400, "invalid_request");
    assert_eq!(get_user(&srv, "lg1").await, user, "unchanged");
    let after = srv.get("/v1/admin/limits", Auth::Admin).await.expect(200);
    assert_eq!(after["limits"]["max_spend_per_day"], "200.00");
    assert_eq!(after["limits"]["max_refunds_per_30_days"], 5);
    // An empty body changes nothing.
    assert_eq!(put_shop(&srv, &json!({})).await.expect(200), after);
}

#[tokio::test]
async fn limits_and_usage_are_still_there_after_a_restart() {
    let mut srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.funded_user("lp1", "20.00").await;
    away_from_boundary(next_hour).await;
    put_shop(&srv, &json!({"max_orders_per_hour": 2}))
        .await
        .expect(200);
    put_user(&srv, "lp1", &json!({"max_spend_per_day": "5.00"}))
        .await
        .expect(200);
    srv.order("lp1", &[("gems", 3)], true).await;
    let before = get_user(&srv, "lp1").await;
    assert_eq!(before["usage"]["spent_today"], "3.00");

    srv.restart().await;

    let shop = srv.get("/v1/admin/limits", Auth::Admin).await.expect(200);
    assert_eq!(shop["limits"]["max_orders_per_hour"], 2);
    let after = get_user(&srv, "lp1").await;
    assert_eq!(after["limits"], before["limits"]);
    assert_eq!(after["overrides"], before["overrides"]);
    assert_eq!(after["usage"]["spent_today"], "3.00");
    assert_eq!(after["usage"]["orders_this_hour"], 1);
    let refused = srv
        .create_order("lp1", &[("gems", 3)], true)
        .await
        .expect_error(409, "limit_exceeded");
    assert_eq!(refused["details"]["limit"], "max_spend_per_day");
    srv.order("lp1", &[("gems", 2)], true).await;
    let refused = srv
        .create_order("lp1", &[("gems", 1)], false)
        .await
        .expect_error(409, "limit_exceeded");
    assert_eq!(refused["details"]["limit"], "max_orders_per_hour");
    srv.audit_ok().await;
}

/// The OpenAPI document says what a limit's field takes: a value in range, `null` or `"default"`.
#[tokio::test]
async fn the_document_describes_each_limit_as_a_value_null_or_default() {
    let srv = Server::start().await;
    let doc = srv.get("/v1/openapi.json", Auth::None).await.expect(200);
    let schemas = &doc["components"]["schemas"];
    let count = &schemas["LimitsRequest"]["properties"]["max_orders_per_hour"];
    assert_eq!(
        count["oneOf"],
        json!([
            {"type": "integer", "minimum": 0, "maximum": 1_000_000},
            {"type": "null"},
            {"type": "string", "enum": ["default"]},
        ]),
        "{count}"
    );
    let money = &schemas["LimitsRequest"]["properties"]["max_spend_per_day"]["oneOf"];
    assert_eq!(money[0]["type"], "string", "{money}");
    assert!(money[0]["pattern"].is_string(), "{money}");
    assert_eq!(schemas["LimitsRequest"]["additionalProperties"], false);
    let in_force = &schemas["LimitsResponse"]["properties"]["max_pending_topups"]["oneOf"];
    assert_eq!(
        in_force.as_array().unwrap().len(),
        2,
        "a value or null: {in_force}"
    );
    for path in ["/v1/admin/limits", "/v1/users/{user_id}/limits"] {
        assert!(doc["paths"][path]["put"].is_object(), "PUT {path}");
        assert!(doc["paths"][path]["get"].is_object(), "GET {path}");
    }
}

/// Limits set through one node hold for a user whose shard another node leads (each shard has its copy
/// of the shop-wide limits), and every replica ends in the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_set_on_one_node_hold_for_a_user_whose_shard_another_node_leads() {
    let c = TestCluster::start(3).await;
    let user = uniq("lc");
    c.api(1).create_item("gems", "currency", "1.00").await;
    let (shard, _) = c.route(&user).await;
    let leader = c.leader_of_shard(shard).await;
    let via = c.ids().into_iter().find(|&id| id != leader).unwrap();
    let api = c.api(via);
    api.funded_user(&user, "20.00").await;
    away_from_boundary(next_hour).await;

    c.api(via)
        .put(
            "/v1/admin/limits",
            Auth::Admin,
            &json!({"max_orders_per_hour": 1}),
        )
        .await
        .expect(200);
    c.api(leader).order(&user, &[("gems", 1)], true).await;
    let refused = c
        .api(leader)
        .create_order(&user, &[("gems", 1)], true)
        .await
        .expect_error(409, "limit_exceeded");
    assert_eq!(refused["details"]["limit"], "max_orders_per_hour");

    // The user's override, set through a follower, lifts it; every node reads the same limits.
    api.put(
        &format!("/v1/users/{user}/limits"),
        Auth::Admin,
        &json!({"max_orders_per_hour": 2}),
    )
    .await
    .expect(200);
    c.api(leader).order(&user, &[("gems", 1)], false).await;
    for id in c.ids() {
        let limits = c
            .api(id)
            .get(&format!("/v1/users/{user}/limits"), Auth::Service)
            .await
            .expect(200);
        assert_eq!(limits["limits"]["max_orders_per_hour"], 2, "node {id}");
        assert_eq!(limits["usage"]["orders_this_hour"], 2, "node {id}");
        let shop = c
            .api(id)
            .get("/v1/admin/limits", Auth::Admin)
            .await
            .expect(200);
        assert_eq!(shop["limits"]["max_orders_per_hour"], 1, "node {id}");
    }
    // The sweeper's commands keep committing: compare the replicas once they have all applied the same.
    c.wait_converged(Duration::from_secs(30)).await;
}
