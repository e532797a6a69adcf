//! Top-ups through the PSP and the signed webhook.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

fn event(event_id: &str, kind: &str, topup: &Value, user: &str, amount: &str) -> Value {
    json!({"event_id": event_id, "type": kind, "topup_id": topup["topup_id"], "user_id": user,
           "amount": amount, "psp_payment_id": format!("pi_{event_id}")})
}

async fn get_topup(srv: &Server, user: &str, topup: &Value) -> Value {
    let id = topup["topup_id"].as_str().unwrap();
    srv.get(&format!("/v1/users/{user}/topups/{id}"), Auth::Service)
        .await
        .expect(200)
}

#[tokio::test]
async fn topup_intent_is_pending_and_credits_nothing() {
    let srv = Server::start().await;
    srv.create_user("t1").await;
    let tok = srv.user_token("t1").await;
    let t = srv
        .post(
            "/v1/users/t1/topups",
            Auth::user(&tok),
            &json!({"amount": "20.00"}),
        )
        .await
        .expect(201);
    assert_uuid_v7(&t["topup_id"]);
    assert_eq!(t["status"], "PENDING");
    assert_eq!(t["amount"], "20.00");
    let exp = ts(&t["expires_at"]);
    assert!(
        exp > time::OffsetDateTime::now_utc() + time::Duration::minutes(30),
        "default topup ttl is 1 h: {t}"
    );
    let got = get_topup(&srv, "t1", &t).await;
    assert_eq!(got["topup_id"], t["topup_id"]);
    assert_eq!(got["status"], "PENDING");
    assert_eq!(got["amount"], "20.00");
    let got_user = srv
        .get(
            &format!("/v1/users/t1/topups/{}", t["topup_id"].as_str().unwrap()),
            Auth::user(&tok),
        )
        .await
        .expect(200);
    assert_eq!(got_user["status"], "PENDING");
    assert_eq!(srv.wallet("t1").await.balance, 0);
    // service and admin may create topups too
    srv.post(
        "/v1/users/t1/topups",
        Auth::Service,
        &json!({"amount": "1.00"}),
    )
    .await
    .expect(201);
    srv.post(
        "/v1/users/t1/topups",
        Auth::Admin,
        &json!({"amount": "1.00"}),
    )
    .await
    .expect(201);
}

#[tokio::test]
async fn webhook_payment_succeeded_credits_once_and_completes_topup() {
    let srv = Server::start().await;
    srv.create_user("t2").await;
    let t = srv.topup("t2", "20.00").await;
    let ev = event("evt_1", "payment.succeeded", &t, "t2", "20.00");
    let r = srv.webhook(&ev).await;
    assert!(r.is_success(), "{r:?}");
    assert_eq!(get_topup(&srv, "t2", &t).await["status"], "COMPLETED");
    assert_eq!(
        srv.wallet("t2").await,
        Wallet {
            balance: 2000,
            held: 0,
            available: 2000
        }
    );

    // Replay of the same event: 200 with the topup, no second credit.
    let r = srv.webhook(&ev).await;
    let v = r.expect(200);
    assert_eq!(v["topup_id"], t["topup_id"], "{r:?}");
    assert_eq!(v["status"], "COMPLETED");
    // Another succeeded event (new event id) for the final topup: no second credit.
    let r = srv
        .webhook(&event("evt_2", "payment.succeeded", &t, "t2", "20.00"))
        .await;
    assert_eq!(r.expect(200)["status"], "COMPLETED");
    // A failed event for a completed topup changes nothing.
    let r = srv
        .webhook(&event("evt_3", "payment.failed", &t, "t2", "20.00"))
        .await;
    assert_eq!(r.expect(200)["status"], "COMPLETED");
    assert_eq!(get_topup(&srv, "t2", &t).await["status"], "COMPLETED");
    assert_eq!(srv.wallet("t2").await.balance, 2000);
    srv.audit_ok().await;
}

#[tokio::test]
async fn webhook_payment_failed_marks_topup_failed_and_later_success_changes_nothing() {
    let srv = Server::start().await;
    srv.create_user("t3").await;
    let t = srv.topup("t3", "9.99").await;
    let r = srv
        .webhook(&event("evt_f", "payment.failed", &t, "t3", "9.99"))
        .await;
    assert!(r.is_success(), "{r:?}");
    assert_eq!(get_topup(&srv, "t3", &t).await["status"], "FAILED");
    let r = srv
        .webhook(&event("evt_s", "payment.succeeded", &t, "t3", "9.99"))
        .await;
    assert_eq!(r.expect(200)["status"], "FAILED");
    assert_eq!(get_topup(&srv, "t3", &t).await["status"], "FAILED");
    assert_eq!(srv.wallet("t3").await.balance, 0);
}

#[tokio::test]
async fn webhook_amount_mismatch_credits_nothing() {
    let srv = Server::start().await;
    srv.create_user("t4").await;
    let t = srv.topup("t4", "20.00").await;
    srv.webhook(&event("evt_m", "payment.succeeded", &t, "t4", "200.00"))
        .await
        .expect_error(409, "amount_mismatch");
    assert_eq!(get_topup(&srv, "t4", &t).await["status"], "PENDING");
    assert_eq!(srv.wallet("t4").await.balance, 0);
    // The correct amount still completes it.
    let r = srv
        .webhook(&event("evt_ok", "payment.succeeded", &t, "t4", "20.00"))
        .await;
    assert!(r.is_success(), "{r:?}");
    assert_eq!(srv.wallet("t4").await.balance, 2000);
}

#[tokio::test]
async fn webhook_signature_is_verified() {
    let srv = Server::start().await;
    srv.create_user("t5").await;
    let t = srv.topup("t5", "5.00").await;
    let body =
        serde_json::to_vec(&event("evt_sig", "payment.succeeded", &t, "t5", "5.00")).unwrap();
    let now = now_unix();
    let good = sign_webhook(PSP_SECRET, now, &body);

    // missing
    srv.webhook_raw(body.clone(), None)
        .await
        .expect_error(401, "invalid_signature");
    // wrong secret
    srv.webhook_raw(
        body.clone(),
        Some(&sign_webhook("not-the-secret", now, &body)),
    )
    .await
    .expect_error(401, "invalid_signature");
    // signature of another body
    let mut tampered = body.clone();
    let pos = tampered.len() - 2;
    tampered.insert(pos, b' ');
    srv.webhook_raw(tampered, Some(&good))
        .await
        .expect_error(401, "invalid_signature");
    // t in the header differs from the signed t
    let v1 = good.split_once(",v1=").unwrap().1;
    srv.webhook_raw(body.clone(), Some(&format!("t={},v1={v1}", now - 1)))
        .await
        .expect_error(401, "invalid_signature");
    // stale and future timestamps
    for t_bad in [now - 301 - 5, now + 301 + 5] {
        srv.webhook_raw(body.clone(), Some(&sign_webhook(PSP_SECRET, t_bad, &body)))
            .await
            .expect_error(401, "invalid_signature");
    }
    // garbage
    for h in [
        "",
        "v1=abc",
        "t=abc,v1=00",
        "t=1",
        &format!("t={now},v1=zz"),
    ] {
        srv.webhook_raw(body.clone(), Some(h))
            .await
            .expect_error(401, "invalid_signature");
    }
    assert_eq!(get_topup(&srv, "t5", &t).await["status"], "PENDING");
    assert_eq!(srv.wallet("t5").await.balance, 0);

    // A bearer token is no substitute for the signature.
    let r = srv
        .call(reqwest::Method::POST, "/v1/psp/webhook")
        .auth(Auth::Admin)
        .raw(body.clone())
        .send()
        .await;
    r.expect_error(401, "invalid_signature");

    // The good one, 290 s old, is accepted.
    let r = srv
        .webhook_raw(
            body.clone(),
            Some(&sign_webhook(PSP_SECRET, now - 290, &body)),
        )
        .await;
    assert!(r.is_success(), "{r:?}");
    assert_eq!(srv.wallet("t5").await.balance, 500);
}

#[tokio::test]
async fn webhook_for_unknown_topup_is_topup_not_found() {
    let srv = Server::start().await;
    srv.create_user("t6").await;
    let fake = json!({"topup_id": uuid::Uuid::now_v7().to_string()});
    srv.webhook(&event("evt_u", "payment.succeeded", &fake, "t6", "5.00"))
        .await
        .expect_error(404, "topup_not_found");
    assert_eq!(srv.wallet("t6").await.balance, 0);
}

#[tokio::test]
async fn get_unknown_topup_is_topup_not_found() {
    let srv = Server::start().await;
    srv.create_user("t7").await;
    let id = uuid::Uuid::now_v7();
    srv.get(&format!("/v1/users/t7/topups/{id}"), Auth::Service)
        .await
        .expect_error(404, "topup_not_found");
}

#[tokio::test]
async fn topup_of_another_user_is_not_visible_under_my_path() {
    let srv = Server::start().await;
    srv.create_user("t8").await;
    srv.create_user("t9").await;
    let t = srv.topup("t8", "5.00").await;
    let id = t["topup_id"].as_str().unwrap();
    srv.get(&format!("/v1/users/t9/topups/{id}"), Auth::Service)
        .await
        .expect_error(404, "topup_not_found");
}

#[tokio::test]
async fn pending_topup_expires_and_a_late_success_still_credits() {
    let srv = Server::start_with(Opts::new().topup_ttl("1s").sweep_interval("200ms")).await;
    srv.create_user("tx").await;
    let t = srv.topup("tx", "4.00").await;
    let exp = ts(&t["expires_at"]);
    let created_ish = time::OffsetDateTime::now_utc();
    assert!(
        (exp - created_ish).whole_seconds() <= 2,
        "topup ttl 1s not applied: {t}"
    );
    sleep_until(exp, Duration::from_millis(100)).await;
    let expired = eventually(Duration::from_secs(5), || async {
        let v = get_topup(&srv, "tx", &t).await;
        (v["status"] == "EXPIRED").then_some(v)
    })
    .await;
    assert!(
        expired.is_some(),
        "topup never became EXPIRED: {}",
        get_topup(&srv, "tx", &t).await
    );
    assert_eq!(srv.wallet("tx").await.balance, 0);

    // The PSP has the money: a success for an expired topup credits it and completes it.
    let r = srv
        .webhook(&event("evt_late", "payment.succeeded", &t, "tx", "4.00"))
        .await;
    assert!(r.is_success(), "{r:?}");
    assert_eq!(get_topup(&srv, "tx", &t).await["status"], "COMPLETED");
    assert_eq!(srv.wallet("tx").await.balance, 400);
    // and only once
    srv.webhook(&event("evt_late", "payment.succeeded", &t, "tx", "4.00"))
        .await
        .expect(200);
    assert_eq!(srv.wallet("tx").await.balance, 400);
    srv.audit_ok().await;
}

#[tokio::test]
async fn topup_for_another_user_is_forbidden_to_a_user_token() {
    let srv = Server::start().await;
    srv.create_user("ta").await;
    srv.create_user("tb").await;
    let tok = srv.user_token("ta").await;
    srv.post(
        "/v1/users/tb/topups",
        Auth::user(&tok),
        &json!({"amount": "1.00"}),
    )
    .await
    .expect_error(403, "forbidden");
}

#[tokio::test]
async fn signed_webhook_with_a_bad_body_is_refused_and_changes_nothing() {
    let srv = Server::start().await;
    srv.create_user("tw").await;
    let t = srv.topup("tw", "3.00").await;
    let signed = |body: &[u8]| sign_webhook(PSP_SECRET, now_unix(), body);
    for body in [
        b"{".to_vec(),
        serde_json::to_vec(&json!({"event_id": "e1", "type": "payment.reversed", "topup_id": t["topup_id"],
                                    "user_id": "tw", "amount": "3.00", "psp_payment_id": "pi"})).unwrap(),
        serde_json::to_vec(&json!({"event_id": "e2", "type": "payment.succeeded", "topup_id": t["topup_id"],
                                    "user_id": "tw", "amount": "3.00", "psp_payment_id": "pi", "extra": 1})).unwrap(),
        serde_json::to_vec(&json!({"type": "payment.succeeded", "topup_id": t["topup_id"],
                                    "user_id": "tw", "amount": "3.00", "psp_payment_id": "pi"})).unwrap(),
    ] {
        let sig = signed(&body);
        srv.webhook_raw(body, Some(&sig))
            .await
            .expect_error(400, "invalid_request");
    }
    let body = serde_json::to_vec(
        &json!({"event_id": "e3", "type": "payment.succeeded", "topup_id": t["topup_id"],
                                          "user_id": "tw", "amount": 3.0, "psp_payment_id": "pi"}),
    )
    .unwrap();
    let sig = signed(&body);
    srv.webhook_raw(body, Some(&sig))
        .await
        .expect_error(422, "invalid_amount");
    assert_eq!(get_topup(&srv, "tw", &t).await["status"], "PENDING");
    assert_eq!(srv.wallet("tw").await.balance, 0);
}

/// Creates a top-up under `key` as `auth`: the raw answer.
async fn topup_with_key(srv: &Server, user: &str, auth: Auth, key: &str) -> Resp {
    srv.post_key(
        &format!("/v1/users/{user}/topups"),
        auth,
        key,
        &json!({"amount": "1.00"}),
    )
    .await
}

#[tokio::test]
async fn the_eleventh_pending_topup_is_limit_exceeded_and_stores_nothing_but_its_outcome() {
    let srv = Server::start().await;
    srv.create_user("cap").await;
    let tok = srv.user_token("cap").await;
    let mut pending = Vec::new();
    for _ in 0..10 {
        let t = topup_with_key(&srv, "cap", Auth::user(&tok), &new_key())
            .await
            .expect(201);
        pending.push(t);
    }
    let key = new_key();
    let refused = topup_with_key(&srv, "cap", Auth::user(&tok), &key).await;
    let body = refused.expect_error(409, "limit_exceeded");
    let details = &body["details"];
    assert_eq!(details["limit"], "max_pending_topups", "{body}");
    assert_eq!(details["max"], 10, "{body}");
    // The earliest of the pending top-ups' deadlines: when one more may be started.
    assert_eq!(details["retry_after"], pending[0]["expires_at"], "{body}");
    // Its outcome is stored (a replay answers it byte for byte; the lookup shows it) and nothing else is:
    // the service is refused too, since the user still has ten pending.
    let replay = topup_with_key(&srv, "cap", Auth::user(&tok), &key).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.body, refused.body);
    let stored = srv
        .get(&format!("/v1/users/cap/idempotency/{key}"), Auth::Service)
        .await
        .expect(200);
    assert_eq!(stored["status"], 409);
    topup_with_key(&srv, "cap", Auth::Service, &new_key())
        .await
        .expect_error(409, "limit_exceeded");
    assert_eq!(srv.wallet("cap").await.balance, 0);

    // One completed (webhook) and one failed: two more may be started, then the cap holds again.
    srv.webhook(&event(
        "evt_cap_ok",
        "payment.succeeded",
        &pending[3],
        "cap",
        "1.00",
    ))
    .await
    .expect(200);
    srv.webhook(&event(
        "evt_cap_ko",
        "payment.failed",
        &pending[4],
        "cap",
        "1.00",
    ))
    .await
    .expect(200);
    for _ in 0..2 {
        topup_with_key(&srv, "cap", Auth::user(&tok), &new_key())
            .await
            .expect(201);
    }
    topup_with_key(&srv, "cap", Auth::user(&tok), &new_key())
        .await
        .expect_error(409, "limit_exceeded");
    // The refused key keeps its outcome.
    let replay = topup_with_key(&srv, "cap", Auth::user(&tok), &key).await;
    assert_eq!(replay.body, refused.body);
    // The cap is per user.
    srv.create_user("cap2").await;
    srv.topup("cap2", "1.00").await;
    srv.audit_ok().await;
}

#[tokio::test]
async fn an_expired_topup_no_longer_counts_against_the_cap() {
    let srv = Server::start_with(
        Opts::new()
            .topup_ttl("2s")
            .env("SHOPKEEP_MAX_PENDING_TOPUPS", "2"),
    )
    .await;
    srv.create_user("cx").await;
    let first = srv.topup("cx", "1.00").await;
    srv.topup("cx", "1.00").await;
    let refused = topup_with_key(&srv, "cx", Auth::Service, &new_key()).await;
    let body = refused.expect_error(409, "limit_exceeded");
    assert_eq!(body["details"]["max"], 2, "{body}");
    // Once the two have expired (swept or not), new top-ups may be started.
    sleep_until(ts(&first["expires_at"]), Duration::from_millis(300)).await;
    for _ in 0..2 {
        srv.topup("cx", "1.00").await;
    }
    topup_with_key(&srv, "cx", Auth::Service, &new_key())
        .await
        .expect_error(409, "limit_exceeded");
}

#[tokio::test]
async fn expired_and_failed_topups_are_purged_after_the_retention() {
    let srv = Server::start_with(
        Opts::new()
            .topup_ttl("1s")
            .sweep_interval("200ms")
            .env("SHOPKEEP_TOPUP_RETENTION", "3s"),
    )
    .await;
    srv.create_user("tp").await;
    let expired = srv.topup("tp", "1.00").await;
    let failed = srv.topup("tp", "2.00").await;
    let completed = srv.topup("tp", "3.00").await;
    srv.webhook(&event("evt_tp_ko", "payment.failed", &failed, "tp", "2.00"))
        .await
        .expect(200);
    srv.webhook(&event(
        "evt_tp_ok",
        "payment.succeeded",
        &completed,
        "tp",
        "3.00",
    ))
    .await
    .expect(200);
    let path = |t: &Value| format!("/v1/users/tp/topups/{}", t["topup_id"].as_str().unwrap());
    // Final, and kept for the retention.
    let seen = eventually(Duration::from_secs(5), || async {
        let v = srv.get(&path(&expired), Auth::Service).await;
        (v.status == 200 && v.json()["status"] == "EXPIRED").then_some(())
    })
    .await;
    assert!(seen.is_some(), "the top-up never read EXPIRED");
    assert_eq!(get_topup(&srv, "tp", &failed).await["status"], "FAILED");
    srv.audit_ok().await;
    // Then purged, both; the completed one stays.
    let purged = eventually(Duration::from_secs(10), || async {
        let gone = |r: Resp| r.status == 404 && r.code().as_deref() == Some("topup_not_found");
        (gone(srv.get(&path(&expired), Auth::Service).await)
            && gone(srv.get(&path(&failed), Auth::Service).await))
        .then_some(())
    })
    .await;
    assert!(
        purged.is_some(),
        "EXPIRED and FAILED top-ups were never purged"
    );
    assert_eq!(
        get_topup(&srv, "tp", &completed).await["status"],
        "COMPLETED"
    );
    assert_eq!(srv.wallet("tp").await.balance, 300);
    srv.audit_ok().await;
}
