//! The wallet ledger.

use serde_json::{Value, json};

use crate::harness::*;

/// Check each entry against the previous one: balance/held move by `amount` as its kind says.
#[track_caller]
fn check_arithmetic(entries: &[Value]) {
    let (mut bal, mut held) = (0i64, 0i64);
    let mut last_seq = 0i64;
    for e in entries {
        assert_uuid_v7(&e["entry_id"]);
        ts(&e["at"]);
        let seq = e["seq"].as_i64().unwrap_or_else(|| panic!("seq: {e}"));
        assert!(seq > last_seq, "seq must increase: {entries:#?}");
        last_seq = seq;
        let amt = money_of(&e["amount"]).abs();
        let b = money_of(&e["balance_after"]);
        let h = money_of(&e["held_after"]);
        assert!(
            e["ref"]["type"].is_string() && e["ref"]["id"].is_string(),
            "ref: {e}"
        );
        match e["kind"].as_str().unwrap() {
            "credit" | "refund" => {
                assert_eq!(b, bal + amt, "{e}");
                assert_eq!(h, held, "{e}");
            }
            "hold" => {
                assert_eq!(b, bal, "{e}");
                assert_eq!(h, held + amt, "{e}");
            }
            "release" => {
                assert_eq!(b, bal, "{e}");
                assert_eq!(h, held - amt, "{e}");
            }
            "debit" => {
                assert_eq!(b, bal - amt, "{e}");
                assert!(h == held - amt || h == held, "{e}");
            }
            k => panic!("unknown ledger kind {k}: {e}"),
        }
        assert!(b >= 0 && h >= 0 && h <= b, "{e}");
        bal = b;
        held = h;
    }
}

fn kinds(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

fn is_subsequence(needle: &[&str], hay: &[String]) -> bool {
    let mut it = hay.iter();
    needle.iter().all(|n| it.any(|h| h == n))
}

#[tokio::test]
async fn ledger_records_every_money_movement_oldest_first() {
    let srv = Server::start().await;
    srv.create_item("gems", "currency", "1.00").await;
    srv.create_user("l1").await;
    let credit = srv.credit("l1", "20.00").await;
    let pending = srv.order("l1", &[("gems", 5)], false).await;
    srv.cancel_order("l1", pending["order_id"].as_str().unwrap(), Auth::Service)
        .await
        .expect(200);
    let held = srv.order("l1", &[("gems", 3)], false).await;
    srv.complete_order("l1", held["order_id"].as_str().unwrap(), Auth::Service)
        .await
        .expect(200);
    let done = srv.order("l1", &[("gems", 2)], true).await;
    srv.refund(
        "l1",
        done["order_id"].as_str().unwrap(),
        Auth::Service,
        &json!({}),
    )
    .await
    .expect(201);

    let v = srv
        .get("/v1/users/l1/ledger", Auth::Service)
        .await
        .expect(200);
    assert!(v.get("next_cursor").is_some_and(|c| c.is_null()), "{v}");
    let entries = v["entries"].as_array().unwrap().clone();
    check_arithmetic(&entries);
    let k = kinds(&entries);
    assert!(
        is_subsequence(
            &[
                "credit", "hold", "release", "hold", "debit", "debit", "refund"
            ],
            &k
        ),
        "unexpected kinds {k:?}"
    );
    let first = &entries[0];
    assert_eq!(first["kind"], "credit");
    assert_eq!(first["seq"], 1);
    assert_eq!(first["amount"], "20.00");
    assert_eq!(first["balance_after"], "20.00");
    assert_eq!(first["held_after"], "0.00");
    assert_includes(
        &first["ref"],
        &json!({"type": "credit", "id": credit["credit_id"]}),
    );
    let last = entries.last().unwrap();
    let w = srv.wallet("l1").await;
    assert_eq!(
        w,
        Wallet {
            balance: 2000 - 300,
            held: 0,
            available: 1700
        }
    );
    assert_eq!(money_of(&last["balance_after"]), w.balance);
    assert_eq!(money_of(&last["held_after"]), w.held);

    // the user reads its own ledger
    let tok = srv.user_token("l1").await;
    let mine = srv
        .get("/v1/users/l1/ledger", Auth::user(&tok))
        .await
        .expect(200);
    assert_eq!(mine["entries"], v["entries"]);
}

#[tokio::test]
async fn ledger_pages_with_cursor_and_checks_limit() {
    let srv = Server::start().await;
    srv.create_user("l2").await;
    for i in 1..=7 {
        srv.credit("l2", &money(i * 100)).await;
    }
    let all = srv
        .get("/v1/users/l2/ledger", Auth::Service)
        .await
        .expect(200);
    let all = all["entries"].as_array().unwrap().clone();
    assert_eq!(all.len(), 7);
    let amounts: Vec<_> = all
        .iter()
        .map(|e| e["amount"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        amounts,
        ["1.00", "2.00", "3.00", "4.00", "5.00", "6.00", "7.00"],
        "oldest first"
    );
    check_arithmetic(&all);

    let mut paged = vec![];
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("limit=3&cursor={}", urlenc(c)),
            None => "limit=3".into(),
        };
        let v = srv
            .get(&format!("/v1/users/l2/ledger?{q}"), Auth::Service)
            .await
            .expect(200);
        let page = v["entries"].as_array().unwrap();
        assert!(page.len() <= 3);
        paged.extend(page.iter().cloned());
        pages += 1;
        assert!(pages <= 5, "paging does not end");
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(paged, all);
    for bad in ["limit=0", "limit=101", "limit=x"] {
        srv.get(&format!("/v1/users/l2/ledger?{bad}"), Auth::Service)
            .await
            .expect_error(400, "invalid_request");
    }
    srv.get("/v1/users/l2/ledger?limit=100", Auth::Service)
        .await
        .expect(200);
}

#[tokio::test]
async fn ledger_default_limit_is_50() {
    let srv = Server::start().await;
    srv.create_user("l3").await;
    for _ in 0..51 {
        srv.credit("l3", "0.01").await;
    }
    let v = srv
        .get("/v1/users/l3/ledger", Auth::Service)
        .await
        .expect(200);
    assert_eq!(v["entries"].as_array().unwrap().len(), 50);
    assert!(v["next_cursor"].is_string(), "{v}");
    let v2 = srv
        .get(
            &format!(
                "/v1/users/l3/ledger?cursor={}",
                urlenc(v["next_cursor"].as_str().unwrap())
            ),
            Auth::Service,
        )
        .await
        .expect(200);
    assert_eq!(v2["entries"].as_array().unwrap().len(), 1);
    assert_eq!(v2["entries"][0]["balance_after"], "0.51");
}
