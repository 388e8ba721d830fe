use std::{sync::Arc, time::Duration};

use serde_json::json;

use crate::helpers::*;

fn lease_path(user: &str) -> String {
    format!("/api/v1/users/{user}/tokens/lease")
}

async fn stored(app: &TestApp, user: &str) -> i64 {
    let r = app.put(&tokens_path(user)).json(garth_body("v1")).send().await;
    assert_eq!(r.status, 201);
    r.json["version"].as_i64().unwrap()
}

#[tokio::test]
async fn acquire_renew_and_refuse() {
    let app = TestApp::spawn().await;
    app.post(&lease_path("nobody")).json(json!({"holder": "w1"})).send().await.assert_problem(404, "tokens_not_found");
    let v = stored(&app, "u").await;
    let r = app.post(&lease_path("u")).json(json!({"holder": "worker-7", "ttl_seconds": 30})).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["fence"], 1);
    assert_eq!(r.json["holder"], "worker-7");
    assert_eq!(r.json["version"], v);
    assert!(r.json["lease_id"].is_string() && r.json["expires_at"].is_string());
    // The same holder gets its live lease back.
    let again = app.post(&lease_path("u")).json(json!({"holder": "worker-7"})).send().await;
    assert_eq!(again.status, 200);
    assert_eq!((again.json["fence"].clone(), again.json["lease_id"].clone()), (json!(1), r.json["lease_id"].clone()));
    // Another holder is refused while it is live.
    let other = app.post(&lease_path("u")).json(json!({"holder": "worker-8"})).send().await;
    other.assert_problem(409, "lease_held");
    assert_eq!(other.json["holder"], "worker-7");
    assert!(other.json["expires_at"].is_string());
    let retry: u64 = other.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry));
    // Bad input.
    for body in
        [json!({"holder": ""}), json!({"holder": "w", "ttl_seconds": 0}), json!({"holder": "w", "ttl_seconds": 301})]
    {
        app.post(&lease_path("u")).json(body).send().await.assert_problem(422, "validation_failed");
    }
    let reader = app.key("tokens:read").await;
    app.post(&lease_path("u")).key(&reader).json(json!({"holder": "w"})).send().await.assert_problem(403, "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_acquirers_get_exactly_one_lease() {
    let app = Arc::new(TestApp::spawn().await);
    stored(&app, "hot").await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..50 {
        let app = app.clone();
        set.spawn(async move {
            let r = app.post(&lease_path("hot")).json(json!({"holder": format!("worker-{i}")})).send().await;
            (r.status.as_u16(), r.json["fence"].as_i64())
        });
    }
    let results = set.join_all().await;
    let granted: Vec<_> = results.iter().filter(|(s, _)| *s == 201).collect();
    assert_eq!(granted.len(), 1, "{results:?}");
    assert_eq!(granted[0].1, Some(1));
    assert_eq!(results.iter().filter(|(s, _)| *s == 409).count(), 49, "{results:?}");
    let granted_events = app.audit().await.iter().filter(|e| e.type_ == "lease.granted").count();
    assert_eq!(granted_events, 1);
}

#[tokio::test]
async fn a_fenced_write_releases_the_lease_and_an_unfenced_one_is_refused() {
    let app = TestApp::spawn().await;
    let v = stored(&app, "f").await;
    let l = app.post(&lease_path("f")).json(json!({"holder": "a"})).send().await;
    let fence = l.json["fence"].as_i64().unwrap().to_string();
    // Someone without the lease may not write meanwhile.
    let r = app.put(&tokens_path("f")).json(garth_body("intruder")).send().await;
    r.assert_problem(409, "lease_held");
    assert_eq!(app.get(&format!("{}/metadata", tokens_path("f"))).send().await.json["version"], v, "nothing written");
    // The holder writes with its fence (and If-Match): accepted, lease released.
    let w = app
        .put(&tokens_path("f"))
        .header("x-lease-fence", &fence)
        .header("if-match", &format!("\"{v}\""))
        .json(garth_body("refreshed"))
        .send()
        .await;
    assert_eq!(w.status, 200, "{}", w.text);
    assert_eq!(w.json["version"], v + 1);
    let next = app.post(&lease_path("f")).json(json!({"holder": "b"})).send().await;
    assert_eq!(next.status, 201, "the lease was released by the write");
    assert_eq!(next.json["fence"], 2, "fences only grow");
    // The old fence is dead.
    app.put(&tokens_path("f"))
        .header("x-lease-fence", &fence)
        .json(garth_body("x"))
        .send()
        .await
        .assert_problem(409, "lease_lost");
    app.put(&tokens_path("f"))
        .header("x-lease-fence", "abc")
        .json(garth_body("x"))
        .send()
        .await
        .assert_problem(422, "validation_failed");
}

#[tokio::test]
async fn if_match_composes_with_the_fence_and_keeps_the_lease() {
    let app = TestApp::spawn().await;
    let v = stored(&app, "c").await;
    let fence = app.post(&lease_path("c")).json(json!({"holder": "a"})).send().await.json["fence"].to_string();
    let r = app
        .put(&tokens_path("c"))
        .header("x-lease-fence", &fence)
        .header("if-match", &format!("\"{}\"", v + 5))
        .json(garth_body("x"))
        .send()
        .await;
    r.assert_problem(412, "version_conflict");
    let r = app
        .put(&tokens_path("c"))
        .header("x-lease-fence", &fence)
        .header("if-match", &format!("\"{v}\""))
        .json(garth_body("x"))
        .send()
        .await;
    assert_eq!(r.status, 200, "the lease survived the 412: {}", r.text);
}

#[tokio::test]
async fn a_stale_fence_is_refused_after_expiry_and_regrant() {
    let app = TestApp::spawn().await;
    let v = stored(&app, "s").await;
    let a = app.post(&lease_path("s")).json(json!({"holder": "slow", "ttl_seconds": 1})).send().await;
    let stale = a.json["fence"].to_string();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let b = app.post(&lease_path("s")).json(json!({"holder": "fast"})).send().await;
    assert_eq!(b.status, 201);
    assert_eq!(b.json["fence"], 2);
    let late = app.put(&tokens_path("s")).header("x-lease-fence", &stale).json(garth_body("dead-token")).send().await;
    late.assert_problem(409, "lease_lost");
    let m = app.get(&format!("{}/metadata", tokens_path("s"))).send().await;
    assert_eq!(m.json["version"], v, "the stale writer wrote nothing");
    let ok = app
        .put(&tokens_path("s"))
        .header("x-lease-fence", &b.json["fence"].to_string())
        .json(garth_body("fresh"))
        .send()
        .await;
    assert_eq!(ok.status, 200);
    let g = app.get(&tokens_path("s")).send().await;
    assert_eq!(g.json["oauth2_token"]["access_token"], "acc-fresh-SECRET");
    let events: Vec<String> = app.audit().await.into_iter().map(|e| e.type_).collect();
    assert!(events.iter().any(|t| t == "lease.lost"), "{events:?}");
}

#[tokio::test]
async fn release_early() {
    let app = TestApp::spawn().await;
    stored(&app, "r").await;
    let fence = app.post(&lease_path("r")).json(json!({"holder": "a"})).send().await.json["fence"].to_string();
    app.delete(&lease_path("r")).send().await.assert_problem(422, "validation_failed");
    assert_eq!(app.delete(&lease_path("r")).header("x-lease-fence", &fence).send().await.status, 204);
    app.delete(&lease_path("r")).header("x-lease-fence", &fence).send().await.assert_problem(409, "lease_lost");
    assert_eq!(app.post(&lease_path("r")).json(json!({"holder": "b"})).send().await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_receive_the_winners_version() {
    let app = Arc::new(TestApp::spawn().await);
    let v = stored(&app, "w").await;
    let fence = app.post(&lease_path("w")).json(json!({"holder": "winner"})).send().await.json["fence"].to_string();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let app = app.clone();
        set.spawn(async move {
            let t = std::time::Instant::now();
            let r = app.get(&format!("{}?newer_than={v}&wait_seconds=10", tokens_path("w"))).send().await;
            (r.status.as_u16(), r.json["version"].as_i64(), r.json["oauth2_token"]["access_token"].clone(), t.elapsed())
        });
    }
    wait_for_waiters(&app, 5).await;
    let w = app.put(&tokens_path("w")).header("x-lease-fence", &fence).json(garth_body("won")).send().await;
    assert_eq!(w.status, 200);
    for (status, version, access, waited) in set.join_all().await {
        assert_eq!(status, 200);
        assert_eq!(version, Some(v + 1));
        assert_eq!(access, "acc-won-SECRET");
        assert!(waited < Duration::from_secs(3), "woken promptly, not at the end of the wait: {waited:?}");
    }
}

#[tokio::test]
async fn long_poll_edges() {
    let app = TestApp::spawn().await;
    let v = stored(&app, "lp").await;
    // Already newer: immediate.
    let r = app.get(&format!("{}?newer_than={}&wait_seconds=10", tokens_path("lp"), v - 1)).send().await;
    assert_eq!(r.status, 200);
    // Nothing new: 304 at the end of the wait.
    let t = std::time::Instant::now();
    let r = app.get(&format!("{}?newer_than={v}&wait_seconds=1", tokens_path("lp"))).send().await;
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some(format!("\"{v}\"").as_str()));
    assert!(t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let r = app.get(&format!("{}?newer_than={v}", tokens_path("lp"))).send().await;
    assert_eq!(r.status, 304, "wait_seconds defaults to 0");
    app.get(&format!("{}?newer_than={v}&wait_seconds=31", tokens_path("lp")))
        .send()
        .await
        .assert_problem(422, "validation_failed");
    app.get(&format!("{}?wait_seconds=3", tokens_path("lp"))).send().await.assert_problem(422, "validation_failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_bounded() {
    let app = Arc::new(
        TestApp::spawn_with(|v| {
            v.insert("CENTRALDB_MAX_WAITERS".into(), "2".into());
        })
        .await,
    );
    let v = stored(&app, "cap").await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let app = app.clone();
        set.spawn(async move {
            app.get(&format!("{}?newer_than={v}&wait_seconds=2", tokens_path("cap"))).send().await.status.as_u16()
        });
    }
    wait_for_waiters(&app, 2).await;
    let r = app.get(&format!("{}?newer_than={v}&wait_seconds=2", tokens_path("cap"))).send().await;
    r.assert_problem(503, "unavailable");
    assert!(r.header("retry-after").is_some());
    assert_eq!(set.join_all().await, vec![304, 304]);
}

#[tokio::test]
async fn the_sweeper_expires_leases_and_keeps_the_fence() {
    let app = TestApp::spawn().await;
    stored(&app, "sw").await;
    app.post(&lease_path("sw")).json(json!({"holder": "a", "ttl_seconds": 5})).send().await;
    let later = centraldb_mfa::store::now() + chrono::Duration::seconds(10);
    let report = centraldb_mfa::sweeper::sweep_once(&app.state, later).await.unwrap();
    assert_eq!(report.leases_expired, 1);
    let again = centraldb_mfa::sweeper::sweep_once(&app.state, later).await.unwrap();
    assert_eq!(again.leases_expired, 0);
    assert_eq!(app.audit().await.iter().filter(|e| e.type_ == "lease.expired").count(), 1);
    let b = app.post(&lease_path("sw")).json(json!({"holder": "b"})).send().await;
    assert_eq!(b.json["fence"], 2);
}

/// Waits (up to 10 s) until exactly `n` readers are registered as waiting for a new version.
async fn wait_for_waiters(app: &TestApp, n: usize) {
    let start = std::time::Instant::now();
    while app.state.notifier.waiting() != n {
        assert!(start.elapsed() < Duration::from_secs(10), "{} waiters, not {n}", app.state.notifier.waiting());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A reader shown to be waiting before the write (registered with the notifier) is answered by
/// that write with the new version, while a control reader of another user, waiting as long,
/// gets 304 at the end of its wait. The wait (3 s) ends before PostgreSQL's fallback re-read
/// (5 s), so there only the write's notification can wake the reader. SQLite re-reads every
/// 0.5 s, so the second half proves the wake-up on both: a notification with no new version
/// behind it wakes the waiting reader of that user (no re-read could), and only that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_waiting_before_the_write_is_woken_by_it() {
    let app = Arc::new(TestApp::spawn().await);
    let v = stored(&app, "lw").await;
    let vc = stored(&app, "lc").await;
    let waiter = |user: &'static str, newer_than: i64| {
        let app = app.clone();
        tokio::spawn(async move {
            app.get(&format!("{}?newer_than={newer_than}&wait_seconds=3", tokens_path(user))).send().await
        })
    };
    let (w, c) = (waiter("lw", v), waiter("lc", vc));
    wait_for_waiters(&app, 2).await;
    let put = app.put(&tokens_path("lw")).json(garth_body("woken")).send().await;
    assert_eq!(put.status, 200, "{}", put.text);
    let r = w.await.unwrap();
    assert_eq!(r.status, 200, "the waiter was not woken by the write: {}", r.text);
    assert_eq!(r.json["version"], v + 1);
    assert_eq!(r.json["oauth2_token"]["access_token"], "acc-woken-SECRET");
    assert_eq!(app.state.notifier.waiting(), 1, "the control reader still waits");
    let rc = c.await.unwrap();
    assert_eq!(rc.status, 304, "{}", rc.text);
    assert_eq!(rc.header("etag"), Some(format!("\"{vc}\"").as_str()));
    assert_eq!(app.state.notifier.waiting(), 0);

    // The notification alone: nothing new is stored, so only it can end the wait early.
    let (w, c) = (waiter("lw", v + 1), waiter("lc", vc));
    wait_for_waiters(&app, 2).await;
    app.state.notifier.publish("lw", v + 2);
    let r = w.await.unwrap();
    assert_eq!(r.status, 200, "a notified waiter was not woken: {}", r.text);
    assert_eq!(r.json["version"], v + 1, "it answers with what is stored");
    assert_eq!(app.state.notifier.waiting(), 1, "the control reader still waits");
    let rc = c.await.unwrap();
    assert_eq!(rc.status, 304, "{}", rc.text);
}

#[tokio::test]
async fn a_renewal_extends_but_never_shortens_the_lease() {
    let app = TestApp::spawn().await;
    stored(&app, "rn").await;
    let first = app.post(&lease_path("rn")).json(json!({"holder": "a", "ttl_seconds": 60})).send().await;
    assert_eq!(first.status, 201, "{}", first.text);
    let granted = time_of(&first.json["expires_at"]);
    // Asking again for less keeps the later expiry.
    let shorter = app.post(&lease_path("rn")).json(json!({"holder": "a", "ttl_seconds": 30})).send().await;
    assert_eq!(shorter.status, 200, "{}", shorter.text);
    assert_eq!(time_of(&shorter.json["expires_at"]), granted, "a renewal never shortens the lease");
    assert_eq!(shorter.json["fence"], first.json["fence"]);
    // Another holder still sees the longer lease.
    let other = app.post(&lease_path("rn")).json(json!({"holder": "b"})).send().await;
    other.assert_problem(409, "lease_held");
    assert_eq!(time_of(&other.json["expires_at"]), granted);
    // Asking for more extends it.
    let longer = app.post(&lease_path("rn")).json(json!({"holder": "a", "ttl_seconds": 120})).send().await;
    assert_eq!(longer.status, 200);
    assert!(time_of(&longer.json["expires_at"]) > granted);
}

#[tokio::test]
async fn logout_ends_the_lease_so_its_fence_cannot_bring_the_login_back() {
    let app = TestApp::spawn().await;
    stored(&app, "lo").await;
    let fence = app.post(&lease_path("lo")).json(json!({"holder": "a"})).send().await.json["fence"].to_string();
    // Without the fence, the holder's live lease stands in the way (nothing changes).
    let r = app.delete(&tokens_path("lo")).send().await;
    r.assert_problem(409, "lease_held");
    assert_eq!(r.json["holder"], "a");
    assert_eq!(app.get(&tokens_path("lo")).send().await.status, 200, "nothing was deleted");
    // With it: logged out, and the lease is over.
    assert_eq!(app.delete(&tokens_path("lo")).header("x-lease-fence", &fence).send().await.status, 204);
    let r = app.put(&tokens_path("lo")).header("x-lease-fence", &fence).json(garth_body("late")).send().await;
    r.assert_problem(409, "lease_lost");
    app.get(&tokens_path("lo")).send().await.assert_problem(404, "tokens_not_found");
    assert_eq!(app.get("/api/v1/users/lo/auth-status").send().await.json["status"], "MISSING");
    // No lease on a bundle that is not there.
    app.post(&lease_path("lo")).json(json!({"holder": "a"})).send().await.assert_problem(404, "tokens_not_found");
    let released: Vec<_> = app.audit().await.into_iter().filter(|e| e.type_ == "lease.released").collect();
    assert_eq!(released.len(), 1);
    assert_eq!(details(&released[0])["by"], "delete");
    // A new login starts over; its first lease has a newer fence.
    assert_eq!(app.put(&tokens_path("lo")).json(garth_body("new")).send().await.status, 201);
    let next = app.post(&lease_path("lo")).json(json!({"holder": "b"})).send().await;
    assert_eq!(next.status, 201);
    assert_eq!(next.json["fence"], 2, "fences survive the logout and keep growing");
}

#[tokio::test]
async fn invalidation_ends_the_lease_so_its_fence_cannot_bring_the_login_back() {
    let app = TestApp::spawn().await;
    stored(&app, "li").await;
    let fence = app.post(&lease_path("li")).json(json!({"holder": "a"})).send().await.json["fence"].to_string();
    let inv = format!("{}/invalidate", tokens_path("li"));
    app.post(&inv).json(json!({"reason": "x"})).send().await.assert_problem(409, "lease_held");
    assert_eq!(app.get(&tokens_path("li")).send().await.status, 200, "nothing was destroyed");
    let r = app.post(&inv).header("x-lease-fence", &fence).json(json!({"reason": "revoked"})).send().await;
    assert_eq!(r.status, 204, "{}", r.text);
    let r = app.put(&tokens_path("li")).header("x-lease-fence", &fence).json(garth_body("late")).send().await;
    r.assert_problem(409, "lease_lost");
    app.get(&tokens_path("li")).send().await.assert_problem(410, "reauth_required");
    assert_eq!(app.get("/api/v1/users/li/auth-status").send().await.json["status"], "EXPIRED");
    // Nothing to refresh: no lease on an invalidated bundle.
    let r = app.post(&lease_path("li")).json(json!({"holder": "a"})).send().await;
    r.assert_problem(410, "reauth_required");
    assert_eq!(r.json["reason"], "revoked");
    let released: Vec<_> = app.audit().await.into_iter().filter(|e| e.type_ == "lease.released").collect();
    assert_eq!(released.len(), 1);
    assert_eq!(details(&released[0])["by"], "invalidate");
}

#[tokio::test]
async fn a_stale_worker_cannot_invalidate_or_delete_fresh_tokens() {
    let app = TestApp::spawn().await;
    let p = tokens_path("st");
    let inv = format!("{p}/invalidate");
    let v1 = stored(&app, "st").await;
    let fence = app.post(&lease_path("st")).json(json!({"holder": "a"})).send().await.json["fence"].to_string();
    // Worker B, without the lease, is refused while A's lease is live.
    let r = app.post(&inv).json(json!({"reason": "refresh_failed"})).send().await;
    r.assert_problem(409, "lease_held");
    assert_eq!(r.json["holder"], "a");
    assert!(r.header("retry-after").is_some());
    app.delete(&p).send().await.assert_problem(409, "lease_held");
    // A's If-Match that does not hold is a 412 and keeps A's lease.
    let r = app.post(&inv).header("x-lease-fence", &fence).header("if-match", "\"9\"").send().await;
    r.assert_problem(412, "version_conflict");
    assert_eq!(r.json["current_version"], v1);
    // A refreshes: version 2, lease released.
    let w = app.put(&p).header("x-lease-fence", &fence).json(garth_body("rotated")).send().await;
    assert_eq!(w.status, 200, "{}", w.text);
    // B acts on what it read (version 1): refused, the refreshed tokens stay.
    let r =
        app.post(&inv).header("if-match", &format!("\"{v1}\"")).json(json!({"reason": "refresh_failed"})).send().await;
    r.assert_problem(412, "version_conflict");
    assert_eq!(r.json["current_version"], v1 + 1);
    let r = app.delete(&p).header("if-match", &format!("\"{v1}\"")).send().await;
    r.assert_problem(412, "version_conflict");
    assert_eq!(r.json["current_version"], v1 + 1);
    // A stale fence is a lost lease here too.
    app.post(&inv).header("x-lease-fence", &fence).send().await.assert_problem(409, "lease_lost");
    app.delete(&p).header("x-lease-fence", &fence).send().await.assert_problem(409, "lease_lost");
    let g = app.get(&p).send().await;
    assert_eq!(g.status, 200);
    assert_eq!(g.json["version"], v1 + 1);
    assert_eq!(g.json["oauth2_token"]["access_token"], "acc-rotated-SECRET");
    let failures = app
        .audit()
        .await
        .into_iter()
        .filter(|e| matches!(e.type_.as_str(), "token.invalidate" | "token.delete" | "lease.lost"))
        .map(|e| (e.type_, e.outcome))
        .collect::<Vec<_>>();
    assert_eq!(failures.len(), 7, "every refusal is audited: {failures:?}");
    assert!(failures.iter().all(|(_, o)| o == "failure"), "{failures:?}");
    // The current version passes.
    let r = app.post(&inv).header("if-match", &format!("\"{}\"", v1 + 1)).send().await;
    assert_eq!(r.status, 204, "{}", r.text);
    let r = app.delete(&p).header("if-match", &format!("\"{}\"", v1 + 2)).send().await;
    assert_eq!(r.status, 204, "{}", r.text);
}

#[tokio::test]
async fn preconditions_of_invalidate_and_delete_on_a_missing_bundle() {
    let app = TestApp::spawn().await;
    let p = tokens_path("none");
    // DELETE: 204 when nothing is stored, but a precondition asking for a bundle fails (RFC 9110).
    assert_eq!(app.delete(&p).send().await.status, 204);
    let r = app.delete(&p).header("if-match", "\"1\"").send().await;
    r.assert_problem(412, "version_conflict");
    assert!(r.json["current_version"].is_null());
    app.delete(&p).header("if-match", "*").send().await.assert_problem(412, "version_conflict");
    // Invalidate: 404 whatever the precondition.
    let inv = format!("{p}/invalidate");
    app.post(&inv).header("if-match", "\"1\"").send().await.assert_problem(404, "tokens_not_found");
    // Malformed or unsupported preconditions are refused, not ignored.
    app.put(&p).json(garth_body("a")).send().await;
    for (k, v) in [("if-match", "W/\"1\""), ("if-none-match", "*"), ("x-lease-fence", "0")] {
        let r = app.delete(&p).header(k, v).send().await;
        r.assert_problem(422, "validation_failed");
        let r = app.post(&inv).header(k, v).send().await;
        r.assert_problem(422, "validation_failed");
    }
    assert_eq!(app.get(&p).send().await.status, 200, "nothing changed");
    assert_eq!(app.delete(&p).header("if-match", "*").send().await.status, 204);
}

/// The 304 carries the stored version as its ETag, not the caller's `newer_than`.
#[tokio::test]
async fn not_modified_carries_the_stored_version() {
    let app = TestApp::spawn().await;
    let v = stored(&app, "nm").await;
    let r = app.get(&format!("{}?newer_than={}", tokens_path("nm"), v + 5)).send().await;
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some(format!("\"{v}\"").as_str()));
    let r = app.get(&format!("{}?newer_than={}&wait_seconds=1", tokens_path("nm"), v + 5)).send().await;
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some(format!("\"{v}\"").as_str()));
}

/// No bundle: the wait ends at once with 404; an invalidated one at once with 410.
#[tokio::test]
async fn a_wait_on_a_missing_or_invalidated_bundle_ends_at_once() {
    let app = TestApp::spawn().await;
    let t = std::time::Instant::now();
    let r = app.get(&format!("{}?newer_than=0&wait_seconds=5", tokens_path("none"))).send().await;
    r.assert_problem(404, "tokens_not_found");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let v = stored(&app, "inv").await;
    let r = app.post(&format!("{}/invalidate", tokens_path("inv"))).json(json!({"reason": "gone"})).send().await;
    assert_eq!(r.status, 204);
    let t = std::time::Instant::now();
    let r = app.get(&format!("{}?newer_than={}&wait_seconds=5", tokens_path("inv"), v + 1)).send().await;
    r.assert_problem(410, "reauth_required");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// A reader already waiting is woken when the bundle is deleted (404) or invalidated (410).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_reader_is_woken_by_delete_and_invalidate() {
    let app = Arc::new(TestApp::spawn().await);
    for (user, act) in [("wd", "delete"), ("wi", "invalidate")] {
        let v = stored(&app, user).await;
        let a = app.clone();
        let w = tokio::spawn(async move {
            let t = std::time::Instant::now();
            let r = a.get(&format!("{}?newer_than={v}&wait_seconds=10", tokens_path(user))).send().await;
            (r, t.elapsed())
        });
        wait_for_waiters(&app, 1).await;
        let r = if act == "delete" {
            app.delete(&tokens_path(user)).send().await
        } else {
            app.post(&format!("{}/invalidate", tokens_path(user))).json(json!({"reason": "r"})).send().await
        };
        assert_eq!(r.status, 204, "{}", r.text);
        let (r, waited) = w.await.unwrap();
        if act == "delete" {
            r.assert_problem(404, "tokens_not_found");
        } else {
            r.assert_problem(410, "reauth_required");
        }
        assert!(waited < Duration::from_secs(4), "{act}: woken promptly, not at the end of the wait: {waited:?}");
        assert_eq!(app.state.notifier.waiting(), 0);
    }
}
