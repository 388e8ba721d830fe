//! The audit log: the events API, the HMAC chain and its verification, re-sealing on rewrap.

use centraldb_mfa::{
    crypto::Keyring,
    services::{audit, audit::AuditContext, keys},
    store::Db,
};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::helpers::*;

const EVENTS: &str = "/api/v1/audit/events";
const VERIFY: &str = "/api/v1/audit/verify";

/// One raw scalar from the database (test assertions).
async fn scalar_i64(app: &TestApp, sql: &str) -> i64 {
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    match app.db() {
        Db::Sqlite { pool, .. } => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        Db::Postgres { pool } => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

async fn chain_key_ids(app: &TestApp) -> Vec<String> {
    let sql = "SELECT DISTINCT chain_key_id FROM audit_events ORDER BY chain_key_id";
    match app.db() {
        Db::Sqlite { pool, .. } => sqlx::query_scalar(sql).fetch_all(pool).await.unwrap(),
        Db::Postgres { pool } => sqlx::query_scalar(sql).fetch_all(pool).await.unwrap(),
    }
}

fn ring(spec: &str) -> Keyring {
    Keyring::parse(&SecretString::from(spec.to_string())).unwrap()
}

/// `n` token writes: events with seq 1..=n (nothing else is audited before them).
async fn app_with_events(n: usize) -> TestApp {
    let app = TestApp::spawn().await;
    for i in 1..=n {
        let r = app.put(&tokens_path(&format!("u{i}"))).json(garth_body(&format!("u{i}"))).send().await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let seqs: Vec<i64> = app.audit().await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=n as i64).collect::<Vec<_>>(), "seq is gap-free from 1");
    app
}

async fn verify(app: &TestApp) -> Value {
    let r = app.get(VERIFY).send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json
}

#[track_caller]
fn assert_broken_at(report: &Value, seq: i64) {
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["first_bad_seq"], seq, "{report}");
    assert!(report["reason"].as_str().is_some_and(|r| !r.is_empty()), "{report}");
}

async fn events(app: &TestApp, query: &str) -> Value {
    let r = app.get(&format!("{EVENTS}{query}")).send().await;
    assert_eq!(r.status, 200, "{query}: {}", r.text);
    r.json
}

fn seqs(page: &Value) -> Vec<i64> {
    page["events"].as_array().unwrap().iter().map(|e| e["seq"].as_i64().unwrap()).collect()
}

// ---- events API ----------------------------------------------------------------------------

#[tokio::test]
async fn events_come_oldest_first_with_every_field_and_no_chain_columns() {
    let app = TestApp::spawn().await;
    app.put(&tokens_path("alice")).header("x-request-id", "req-aud-1").json(garth_body("alice")).send().await;
    app.get(&tokens_path("alice")).send().await;
    app.get(&tokens_path("alice")).no_auth().send().await;
    let page = events(&app, "").await;
    assert_eq!(seqs(&page), vec![1, 2, 3]);
    assert!(page["next_after"].is_null());
    let e = &page["events"][0];
    let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["actor", "at", "details", "id", "outcome", "request_id", "seq", "source_ip", "type", "user_id"],
        "exactly the contract's fields: no hmac or chain key id"
    );
    assert_eq!(e["type"], "token.write");
    assert_eq!(e["outcome"], "success");
    assert_eq!(e["user_id"], "alice");
    assert_eq!(e["request_id"], "req-aud-1");
    assert!(e["actor"].as_str().unwrap().starts_with("key:"));
    assert!(e["details"].is_object(), "details are a JSON object: {e}");
    assert_eq!(e["details"]["kind"], "garth");
    assert_eq!(e["details"]["version"], 1);
    uuid::Uuid::parse_str(e["id"].as_str().unwrap()).unwrap();
    let at = e["at"].as_str().unwrap();
    assert!(at.ends_with('Z'), "{at}");
    chrono::DateTime::parse_from_rfc3339(at).unwrap();
    let denied = &page["events"][2];
    assert_eq!((denied["type"].as_str(), denied["outcome"].as_str()), (Some("auth.denied"), Some("denied")));
    assert!(denied["user_id"].is_null());
    assert!(!page.to_string().contains("hmac") && !page.to_string().contains("chain_key"));
}

#[tokio::test]
async fn events_filter_by_user_type_outcome_and_time() {
    let app = TestApp::spawn().await;
    for u in ["alice", "bob"] {
        app.put(&tokens_path(u)).json(garth_body(u)).send().await;
        app.get(&tokens_path(u)).send().await;
    }
    app.get(&tokens_path("nobody")).send().await; // token.read failure
    app.get(&tokens_path("alice")).no_auth().send().await; // auth.denied
    let all = events(&app, "").await["events"].as_array().unwrap().clone();
    assert_eq!(all.len(), 6);

    let alice = events(&app, "?user_id=alice").await;
    assert_eq!(seqs(&alice), vec![1, 2]);
    let reads = events(&app, "?type=token.read").await;
    assert_eq!(seqs(&reads), vec![2, 4, 5]);
    let failed_reads = events(&app, "?type=token.read&outcome=failure").await;
    assert_eq!(seqs(&failed_reads), vec![5]);
    assert_eq!(failed_reads["events"][0]["user_id"], "nobody");
    let denied = events(&app, "?outcome=denied").await;
    assert_eq!(seqs(&denied), vec![6]);
    let bob_writes = events(&app, "?user_id=bob&type=token.write").await;
    assert_eq!(seqs(&bob_writes), vec![3]);
    assert_eq!(seqs(&events(&app, "?user_id=carol").await), Vec::<i64>::new());

    // since is inclusive, until exclusive; together they split the log exactly.
    let at = |i: usize| all[i]["at"].as_str().unwrap().to_string();
    let t = at(3);
    let enc = |s: &str| s.replace('+', "%2B").replace(':', "%3A");
    let before = events(&app, &format!("?until={}", enc(&t))).await;
    let from = events(&app, &format!("?since={}", enc(&t))).await;
    let mut joined = seqs(&before);
    joined.extend(seqs(&from));
    assert_eq!(joined, vec![1, 2, 3, 4, 5, 6], "until={t} and since={t} partition the log");
    assert!(seqs(&from).contains(&4), "since is inclusive");
    assert!(from["events"].as_array().unwrap().iter().all(|e| e["at"].as_str().unwrap() >= t.as_str()), "{from}");
    let window = events(&app, &format!("?since={}&until={}", enc(&at(1)), enc(&at(4)))).await;
    let expected: Vec<i64> = all
        .iter()
        .filter(|e| e["at"].as_str().unwrap() >= at(1).as_str() && e["at"].as_str().unwrap() < at(4).as_str())
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs(&window), expected);
    // An offset other than Z means the same instant.
    let far_past = events(&app, "?since=2000-01-01T02:00:00%2B02:00").await;
    assert_eq!(seqs(&far_past).len(), 6);
    assert_eq!(seqs(&events(&app, "?until=2000-01-01T00:00:00Z").await), Vec::<i64>::new());
}

#[tokio::test]
async fn the_cursor_pages_through_the_log_and_limits_are_enforced() {
    let app = app_with_events(7).await;
    let mut after: Option<i64> = None;
    let mut seen: Vec<i64> = Vec::new();
    let mut pages = 0;
    loop {
        let q = match after {
            Some(a) => format!("?limit=3&after={a}"),
            None => "?limit=3".to_string(),
        };
        let page = events(&app, &q).await;
        pages += 1;
        let s = seqs(&page);
        assert!(s.len() <= 3);
        seen.extend(&s);
        match page["next_after"].as_i64() {
            Some(n) => {
                assert_eq!(Some(&n), s.last(), "next_after is the page's last seq");
                after = Some(n);
            }
            None => break,
        }
        assert!(pages < 10);
    }
    assert_eq!(seen, (1..=7).collect::<Vec<_>>());
    assert_eq!(pages, 3);
    // A page exactly full still offers a cursor; the next page is empty and ends it.
    let full = events(&app, "?limit=7").await;
    assert_eq!(full["next_after"], 7);
    let rest = events(&app, "?after=7").await;
    assert_eq!(seqs(&rest), Vec::<i64>::new());
    assert!(rest["next_after"].is_null());
    // The default is 100, the most 1000.
    let app_many = app_with_events(0).await;
    for i in 0..105 {
        app_many.get(&tokens_path(&format!("m{i}"))).send().await;
    }
    let page = events(&app_many, "").await;
    assert_eq!(seqs(&page).len(), 100);
    assert_eq!(page["next_after"], 100);
    assert_eq!(seqs(&events(&app_many, "?limit=1000").await).len(), 105);
    assert_eq!(seqs(&events(&app_many, "?limit=1").await), vec![1]);
    assert_eq!(seqs(&events(&app_many, "?after=103").await), vec![104, 105]);
}

#[tokio::test]
async fn bad_query_values_are_422_naming_the_field() {
    let app = app_with_events(1).await;
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-5", "limit"),
        ("limit=ten", "limit"),
        ("limit=", "limit"),
        ("after=-1", "after"),
        ("after=abc", "after"),
        ("since=yesterday", "since"),
        ("since=2026-01-01", "since"),
        ("until=2026-13-01T00:00:00Z", "until"),
        ("since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z", "until"),
        ("outcome=maybe", "outcome"),
        ("user_id=bad%20id", "user_id"),
        ("user_id=", "user_id"),
        ("type=", "type"),
        ("type=token%20read", "type"),
    ] {
        let r = app.get(&format!("{EVENTS}?{query}")).send().await;
        r.assert_problem(422, "validation_failed");
        assert_eq!(r.json["field"], field, "{query}: {}", r.text);
    }
}

#[tokio::test]
async fn events_never_hold_secrets() {
    let app = TestApp::spawn().await;
    let writer = app.key("tokens:read tokens:write").await;
    app.put(&tokens_path("s1")).key(&writer).json(garth_body("s1")).send().await;
    let di = json!({"kind": "garminconnect", "di_token": jwt(future(3600), "DISECRET"),
                    "di_refresh_token": "di-refresh-DISECRET", "di_client_id": "di-client-DISECRET"});
    app.put(&tokens_path("s2")).key(&writer).json(di).send().await;
    app.get(&tokens_path("s1")).key(&writer).send().await;
    app.get(&format!("{}?representation=garth_dump", tokens_path("s1"))).key(&writer).send().await;
    app.get(&tokens_path("s2")).key(&writer).send().await;
    app.get(&tokens_path("s1")).key("cdbm_guessed-KEYSECRET").send().await;
    app.post(&format!("{}/invalidate", tokens_path("s2"))).key(&writer).json(json!({"reason": "test"})).send().await;
    let r = app.get(&format!("{EVENTS}?limit=1000")).send().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["events"].as_array().unwrap().len(), 7);
    let mut secrets = garth_secrets("s1");
    secrets.extend(["DISECRET".into(), "KEYSECRET".into(), writer.clone(), ADMIN_KEY.into()]);
    let key_b64 = app.vars["CENTRALDB_ENCRYPTION_KEYS"].split_once(':').unwrap().1.to_string();
    secrets.push(key_b64);
    for s in &secrets {
        assert!(!r.text.contains(s.as_str()), "secret {s:.12}… in the audit events");
    }
}

#[tokio::test]
async fn reading_the_log_is_not_audited_but_refusals_are() {
    let app = app_with_events(2).await;
    let reader = app.key("audit:read").await;
    let tokens_reader = app.key("tokens:read").await;
    assert_eq!(app.get(EVENTS).key(&reader).send().await.status, 200);
    assert_eq!(app.get(VERIFY).send().await.status, 200);
    assert_eq!(app.audit().await.len(), 2, "reading events and verifying write nothing");

    let r = app.get(VERIFY).key(&reader).send().await;
    r.assert_problem(403, "forbidden");
    assert_eq!(r.json["required_scope"], "admin");
    app.get(EVENTS).key(&tokens_reader).send().await.assert_problem(403, "forbidden");
    app.get(EVENTS).no_auth().send().await.assert_problem(401, "unauthenticated");
    let denied: Vec<_> = app.audit().await.into_iter().skip(2).collect();
    assert_eq!(denied.len(), 3, "each refusal is audited");
    assert!(denied.iter().all(|e| e.type_ == "auth.denied" && e.outcome == "denied"));
    assert!(denied[0].details.contains("/api/v1/audit/verify") && denied[0].details.contains("\"admin\""));
    assert!(denied[1].details.contains("\"audit:read\""));
    assert_eq!(verify(&app).await["ok"], true, "refusals are chained like everything else");
}

// ---- the chain -----------------------------------------------------------------------------

#[tokio::test]
async fn an_untouched_log_verifies() {
    let app = TestApp::spawn().await;
    let empty = verify(&app).await;
    assert_eq!(empty, json!({"ok": true, "events_checked": 0}));
    for i in 0..5 {
        app.put(&tokens_path(&format!("v{i}"))).json(garth_body("v")).send().await;
    }
    app.get(&tokens_path("v1")).no_auth().send().await;
    let r = verify(&app).await;
    assert_eq!(r, json!({"ok": true, "events_checked": 6}), "no first_bad_seq or reason when ok");
    assert_eq!(chain_key_ids(&app).await, ["k1"]);
    // The newest chain head is at the newest event (the log is partitioned: one head per chain).
    assert_eq!(scalar_i64(&app, "SELECT MAX(last_seq) FROM audit_heads").await, 6);
}

#[tokio::test]
async fn concurrent_writers_keep_the_chain_gap_free_and_valid() {
    let app = TestApp::spawn().await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let router = app.router.clone();
        tasks.push(tokio::spawn(async move {
            use tower::ServiceExt;
            let req = axum::http::Request::put(tokens_path(&format!("c{i}")))
                .header("authorization", format!("Bearer {ADMIN_KEY}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(garth_body("c").to_string()))
                .unwrap();
            router.oneshot(req).await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    let seqs: Vec<i64> = app.audit().await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=24).collect::<Vec<_>>());
    assert_eq!(verify(&app).await, json!({"ok": true, "events_checked": 24}));
}

/// Reads are audited in batches (one transaction, a few statements for many events): the chain
/// stays gap-free and valid, every read has its own row, and each bundle's `last_used_at` is the
/// latest instant a read of it reported.
#[tokio::test]
async fn concurrent_reads_are_batched_into_a_valid_chain_with_exact_last_used() {
    let app = TestApp::spawn().await;
    let users: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
    for u in &users {
        assert_eq!(app.put(&tokens_path(u)).json(garth_body(u)).send().await.status, 201);
    }
    let mut tasks = Vec::new();
    for round in 0..10 {
        for u in &users {
            let router = app.router.clone();
            let u = u.clone();
            tasks.push(tokio::spawn(async move {
                use tower::ServiceExt;
                let uri = if round % 3 == 2 { format!("{}/metadata", tokens_path(&u)) } else { tokens_path(&u) };
                let req = axum::http::Request::get(uri)
                    .header("authorization", format!("Bearer {ADMIN_KEY}"))
                    .body(axum::body::Body::empty())
                    .unwrap();
                let res = router.oneshot(req).await.unwrap();
                assert_eq!(res.status(), 200);
                let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
                let v: Value = serde_json::from_slice(&body).unwrap();
                let decrypting = round % 3 != 2;
                (u, decrypting, v["last_used_at"].as_str().map(str::to_string))
            }));
        }
    }
    let mut latest: std::collections::HashMap<String, chrono::DateTime<chrono::FixedOffset>> = Default::default();
    for t in tasks {
        let (u, decrypting, at) = t.await.unwrap();
        if decrypting {
            let at = chrono::DateTime::parse_from_rfc3339(&at.unwrap()).unwrap();
            let e = latest.entry(u).or_insert(at);
            *e = (*e).max(at);
        }
    }
    let events = app.audit().await;
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=88).collect::<Vec<_>>());
    let reads = events.iter().filter(|e| e.type_ == "token.read").count();
    let meta = events.iter().filter(|e| e.type_ == "token.metadata_read").count();
    assert_eq!((reads, meta), (56, 24), "one row per read");
    assert_eq!(verify(&app).await, json!({"ok": true, "events_checked": 88}));
    for u in &users {
        let m = app.get(&format!("{}/metadata", tokens_path(u))).send().await;
        let stored = chrono::DateTime::parse_from_rfc3339(m.json["last_used_at"].as_str().unwrap()).unwrap();
        assert_eq!(stored, latest[u], "{u}: last_used_at is the latest read's instant");
    }
}

#[tokio::test]
async fn an_edited_row_is_found() {
    let app = app_with_events(5).await;
    app.exec(r#"UPDATE audit_events SET details = '{"kind":"garth","version":7}' WHERE seq = 3"#).await;
    let r = verify(&app).await;
    assert_broken_at(&r, 3);
    assert_eq!(r["events_checked"], 2);
}

#[tokio::test]
async fn edits_to_any_column_are_found() {
    for (col, value) in [
        ("type", "'token.read'"),
        ("outcome", "'failure'"),
        ("user_id", "NULL"),
        ("actor", "''"),
        ("request_id", "'forged'"),
        ("source_ip", "'10.0.0.1'"),
        ("chain_key_id", "'k1'"), // unchanged value: must still verify
    ] {
        let app = app_with_events(3).await;
        app.exec(&format!("UPDATE audit_events SET {col} = {value} WHERE seq = 2")).await;
        let r = verify(&app).await;
        if col == "chain_key_id" {
            assert_eq!(r["ok"], true, "{r}");
        } else {
            assert_broken_at(&r, 2);
        }
    }
}

#[tokio::test]
async fn a_deleted_row_is_found() {
    let app = app_with_events(6).await;
    app.exec("DELETE FROM audit_events WHERE seq = 4").await;
    let r = verify(&app).await;
    assert_broken_at(&r, 4);
    assert_eq!(r["events_checked"], 3);
    assert!(r["reason"].as_str().unwrap().contains("missing"), "{r}");
}

#[tokio::test]
async fn reordered_rows_are_found() {
    // Two rows swap places (their contents, seals included, trade seq numbers).
    let app = app_with_events(5).await;
    app.exec("UPDATE audit_events SET seq = -2 WHERE seq = 2").await;
    app.exec("UPDATE audit_events SET seq = 2 WHERE seq = 3").await;
    app.exec("UPDATE audit_events SET seq = 3 WHERE seq = -2").await;
    let ids: Vec<i64> = app.audit().await.iter().map(|e| e.seq).collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5], "no gap: only the order changed");
    assert_broken_at(&verify(&app).await, 2);

    // Two rows swap contents, each keeping its seq and seal.
    let app = app_with_events(5).await;
    let swap = "UPDATE audit_events SET details = CASE seq WHEN 3 THEN (SELECT details FROM audit_events WHERE seq = 4) \
                ELSE (SELECT details FROM audit_events WHERE seq = 3) END, \
                user_id = CASE seq WHEN 3 THEN 'u4' ELSE 'u3' END WHERE seq IN (3, 4)";
    app.exec(swap).await;
    assert_eq!(app.audit().await[2].user_id.as_deref(), Some("u4"));
    assert_broken_at(&verify(&app).await, 3);
}

#[tokio::test]
async fn a_deleted_last_row_is_found() {
    let app = app_with_events(4).await;
    app.exec("DELETE FROM audit_events WHERE seq = 4").await;
    let r = verify(&app).await;
    assert_broken_at(&r, 4);
    assert_eq!(r["events_checked"], 3);
    // Deleting everything is found too.
    app.exec("DELETE FROM audit_events").await;
    assert_broken_at(&verify(&app).await, 1);
}

#[tokio::test]
async fn an_appended_copy_of_a_row_is_found() {
    // A row replayed at the end (its seal copied, the head moved to match) does not verify there.
    let app = app_with_events(3).await;
    let new_id = match backend() {
        Backend::Sqlite => "randomblob(16)",
        Backend::Postgres => "gen_random_uuid()",
    };
    app.exec(&format!(
        "INSERT INTO audit_events (seq, id, at, type, outcome, user_id, actor, request_id, source_ip, details, \
         chain_id, pos, chain_key_id, hmac) SELECT 4, {new_id}, at, type, outcome, user_id, actor, request_id, \
         source_ip, details, chain_id, pos + 1, chain_key_id, hmac FROM audit_events WHERE seq = 3"
    ))
    .await;
    app.exec(
        "UPDATE audit_heads SET last_pos = last_pos + 1, last_seq = 4 \
         WHERE chain_id = (SELECT chain_id FROM audit_events WHERE seq = 3)",
    )
    .await;
    let r = verify(&app).await;
    assert_broken_at(&r, 4);
    assert_eq!(r["events_checked"], 3);
}

#[tokio::test]
async fn a_row_moved_before_the_start_is_found() {
    let app = app_with_events(3).await;
    app.exec("UPDATE audit_events SET seq = -1 WHERE seq = 1").await;
    let r = verify(&app).await;
    assert_broken_at(&r, -1);
    assert_eq!(r["events_checked"], 0);
}

#[tokio::test]
async fn a_row_beyond_the_head_is_found() {
    let app = app_with_events(3).await;
    // The head of seq 3's chain rewound so that it no longer covers it.
    app.exec(
        "UPDATE audit_heads SET last_pos = last_pos - 1, last_seq = 0 \
         WHERE chain_id = (SELECT chain_id FROM audit_events WHERE seq = 3)",
    )
    .await;
    assert_broken_at(&verify(&app).await, 3);
}

#[tokio::test]
async fn a_seal_under_an_unknown_key_id_names_it() {
    let app = app_with_events(3).await;
    app.exec("UPDATE audit_events SET chain_key_id = 'k9' WHERE seq = 2").await;
    let r = verify(&app).await;
    assert_broken_at(&r, 2);
    assert!(r["reason"].as_str().unwrap().contains("'k9'"), "{r}");
}

#[tokio::test]
async fn an_unreadable_row_is_named_and_earlier_rows_still_count() {
    let app = app_with_events(4).await;
    match backend() {
        // SQLite stores any text: a timestamp no one can parse.
        Backend::Sqlite => app.exec("UPDATE audit_events SET at = 'not a time' WHERE seq = 3").await,
        Backend::Postgres => app.exec("UPDATE audit_events SET at = at + interval '1 microsecond' WHERE seq = 3").await,
    }
    let r = verify(&app).await;
    assert_broken_at(&r, 3);
    assert_eq!(r["events_checked"], 2);
}

#[tokio::test]
async fn if_the_audit_row_cannot_be_written_the_act_does_not_happen() {
    let app = app_with_events(1).await;
    app.exec("DELETE FROM audit_heads").await;
    app.put(&tokens_path("lost")).json(garth_body("lost")).send().await.assert_problem(500, "internal_error");
    assert_eq!(scalar_i64(&app, "SELECT COUNT(*) FROM token_bundles WHERE user_id = 'lost'").await, 0);
    assert_eq!(app.audit().await.len(), 1);
    let r = verify(&app).await;
    assert_eq!(r["ok"], false);
    assert!(r["reason"].as_str().unwrap().contains("head"), "{r}");
}

// ---- keys: start-up check, rewrap re-seals -----------------------------------------------

#[tokio::test]
async fn a_keyring_that_cannot_verify_the_chain_is_refused_naming_the_key() {
    let app = TestApp::spawn().await;
    // Events under k1, but no ciphertext: only the audit chain needs k1.
    app.get(&tokens_path("nobody")).send().await;
    app.get(&tokens_path("nobody")).no_auth().send().await;
    let only_k2 = ring(&key_spec("k2"));
    let err = keys::verify_keyring(app.db(), &only_k2).await.unwrap_err().to_string();
    assert!(err.contains("audit log") && err.contains("'k1'") && err.contains("rewrap"), "{err}");
    let r = audit::verify(app.db(), &only_k2).await.unwrap();
    assert_eq!((r.ok, r.first_bad_seq), (false, Some(1)));
    assert!(r.reason.unwrap().contains("'k1'"));
}

#[tokio::test]
async fn rewrap_reseals_the_chain_so_the_old_key_can_go() {
    let app = app_with_events(4).await;
    let k1 = app.vars["CENTRALDB_ENCRYPTION_KEYS"].clone();
    let k2 = key_spec("k2");
    let both = ring(&format!("{k2},{k1}"));
    let only_k2 = ring(&k2);
    // Without k1 the data cannot be read nor the chain checked: start-up refuses, naming it.
    let err = keys::verify_keyring(app.db(), &only_k2).await.unwrap_err().to_string();
    assert!(err.contains("'k1'"), "{err}");
    keys::verify_keyring(app.db(), &both).await.unwrap();
    // After the switch, new events are sealed under k2; the chain verifies across the change.
    let mut tx = app.db().begin_write().await.unwrap();
    let seq = audit::record(
        &mut tx.conn(),
        &both,
        &AuditContext::system("test"),
        "test.event",
        audit::Outcome::Success,
        None,
        json!({}),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(seq, 5);
    assert_eq!(chain_key_ids(&app).await, ["k1", "k2"]);
    let r = audit::verify(app.db(), &both).await.unwrap();
    assert!(r.ok && r.events_checked == 5, "{r:?}");
    // An instance that does not have k2 yet cannot check the new event, and says so.
    let r = verify(&app).await;
    assert_broken_at(&r, 5);
    assert!(r["reason"].as_str().unwrap().contains("'k2'"), "{r}");

    let report = keys::rewrap(app.db(), &both, &AuditContext::system("test")).await.unwrap();
    assert_eq!(report.rewrapped, 4);
    assert_eq!(report.resealed, 5, "every event from the first one under k1 on");
    assert_eq!(report.audit_broken, None);
    assert_eq!(chain_key_ids(&app).await, ["k2"], "the key.rewrap event too is under k2");
    let last = app.audit().await.pop().unwrap();
    assert_eq!((last.seq, last.type_.as_str(), last.outcome.as_str()), (6, "key.rewrap", "success"));
    assert!(last.details.contains("\"audit_resealed\":5"), "{}", last.details);
    // The old key can go.
    keys::verify_keyring(app.db(), &only_k2).await.unwrap();
    let r = audit::verify(app.db(), &only_k2).await.unwrap();
    assert!(r.ok && r.events_checked == 6, "{r:?}");
    // A second pass has nothing to re-seal, and the chain still verifies after it.
    let again = keys::rewrap(app.db(), &both, &AuditContext::system("test")).await.unwrap();
    assert_eq!((again.rewrapped, again.resealed, again.audit_broken), (0, 0, None));
    let r = audit::verify(app.db(), &only_k2).await.unwrap();
    assert!(r.ok && r.events_checked == 7, "{r:?}");
}

#[tokio::test]
async fn rewrap_refuses_to_reseal_a_broken_chain() {
    let app = app_with_events(4).await;
    let k1 = app.vars["CENTRALDB_ENCRYPTION_KEYS"].clone();
    let both = ring(&format!("{},{k1}", key_spec("k2")));
    app.exec(r#"UPDATE audit_events SET details = '{}' WHERE seq = 2"#).await;
    let report = keys::rewrap(app.db(), &both, &AuditContext::system("test")).await.unwrap();
    assert_eq!(report.rewrapped, 4, "ciphertexts are still rewrapped");
    assert_eq!(report.resealed, 0);
    let broken = report.audit_broken.expect("the broken chain is reported");
    assert_eq!(broken.first_bad_seq, Some(2));
    assert_eq!(chain_key_ids(&app).await, ["k1", "k2"], "only the key.rewrap event is under k2");
    let r = audit::verify(app.db(), &both).await.unwrap();
    assert_eq!(r.first_bad_seq, Some(2), "the evidence is left as it was");
    let last = app.audit().await.pop().unwrap();
    assert_eq!((last.type_.as_str(), last.outcome.as_str()), ("key.rewrap", "failure"));
}

/// Every event names the peer address the request came from (the `ConnectInfo` the server
/// attaches), IPv4 and IPv6, for writes, reads and refusals alike, and the events API returns it.
#[tokio::test]
async fn events_record_the_peer_address_of_the_request() {
    let app = TestApp::spawn().await;
    let v4: std::net::SocketAddr = "192.0.2.17:51000".parse().unwrap();
    let v6: std::net::SocketAddr = "[2001:db8::42]:443".parse().unwrap();
    let p = tokens_path("peer");
    assert_eq!(app.put(&p).json(garth_body("peer")).send().await.status, 201);
    assert_eq!(app.get(&p).peer(v4).send().await.status, 200);
    app.get(&p).no_auth().peer(v6).send().await.assert_problem(401, "unauthenticated");
    let rows: Vec<(String, Option<String>)> = app.audit().await.into_iter().map(|e| (e.type_, e.source_ip)).collect();
    assert_eq!(
        rows,
        vec![
            ("token.write".to_string(), Some(app.peer().ip().to_string())),
            ("token.read".to_string(), Some("192.0.2.17".to_string())),
            ("auth.denied".to_string(), Some("2001:db8::42".to_string())),
        ]
    );
    let r = app.get(EVENTS).send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    let ips: Vec<&Value> = r.json["events"].as_array().unwrap().iter().map(|e| &e["source_ip"]).collect();
    assert_eq!(ips, [&json!(app.peer().ip().to_string()), &json!("192.0.2.17"), &json!("2001:db8::42")]);
    // Apps get different addresses, so a test can tell its callers apart.
    let other = TestApp::spawn().await;
    assert_ne!(other.peer().ip(), app.peer().ip());
}

/// The event id is sealed too: giving a row another id (a valid UUID, everything else intact)
/// breaks the chain at that row.
#[tokio::test]
async fn an_edited_id_is_found() {
    let app = app_with_events(4).await;
    let before = app.audit().await;
    let new_id = match backend() {
        Backend::Sqlite => "randomblob(16)",
        Backend::Postgres => "gen_random_uuid()",
    };
    app.exec(&format!("UPDATE audit_events SET id = {new_id} WHERE seq = 3")).await;
    let after = app.audit().await;
    assert_ne!(after[2].id, before[2].id, "the id changed");
    assert_eq!(after[2].details, before[2].details, "and nothing else did");
    let r = verify(&app).await;
    assert_broken_at(&r, 3);
    assert_eq!(r["events_checked"], 2);
}

// ---- the authenticated head, retention (issue 15, findings 4 and 5) -------------------------

/// `centraldb-mfa audit verify` (the real binary) against the app's database: (exit ok, stdout).
async fn cli_verify(app: &TestApp) -> (bool, String) {
    cli(app, &["audit", "verify"]).await
}

/// Rewrites the chain heads, without the key, so that the log ends at event `seq`: every head
/// past it is set to its chain's last event at or before it (its position, seq and HMAC), or to
/// empty.
async fn rewind_head_to(app: &TestApp, seq: i64) {
    let zeros = match backend() {
        Backend::Sqlite => "zeroblob(32)",
        Backend::Postgres => "decode(repeat('00', 32), 'hex')",
    };
    let last = |col: &str| {
        format!(
            "(SELECT e.{col} FROM audit_events e WHERE e.chain_id = audit_heads.chain_id AND e.seq <= {seq} \
             ORDER BY e.seq DESC LIMIT 1)"
        )
    };
    app.exec(&format!(
        "UPDATE audit_heads SET last_pos = COALESCE({}, 0), last_seq = COALESCE({}, 0), last_hmac = COALESCE({}, {zeros}) \
         WHERE last_seq > {seq}",
        last("pos"),
        last("seq"),
        last("hmac")
    ))
    .await;
}

#[tokio::test]
async fn deleting_the_newest_events_and_rewinding_the_head_without_the_key_is_found() {
    let app = app_with_events(5).await;
    assert_eq!(cli_verify(&app).await, (true, "audit chain ok: 5 events".to_string()));
    app.exec("DELETE FROM audit_events WHERE seq > 3").await;
    rewind_head_to(&app, 3).await;
    let r = verify(&app).await;
    assert_broken_at(&r, 4);
    assert_eq!(r["events_checked"], 3);
    assert!(r["reason"].as_str().unwrap().contains("MAC"), "{r}");
    let (ok, out) = cli_verify(&app).await;
    assert!(!ok && out.starts_with("audit chain BROKEN at seq 4: the chain head's MAC does not verify"), "{out}");
}

#[tokio::test]
async fn wiping_the_log_and_zeroing_the_head_is_found() {
    let app = app_with_events(3).await;
    app.exec("DELETE FROM audit_events").await;
    rewind_head_to(&app, 0).await;
    let r = verify(&app).await;
    assert_broken_at(&r, 1);
    assert_eq!(r["events_checked"], 0);
    let (ok, out) = cli_verify(&app).await;
    assert!(!ok && out.starts_with("audit chain BROKEN at seq 1: "), "{out}");
}

#[tokio::test]
async fn a_consistent_rewind_to_an_older_copy_is_not_detectable_from_inside_but_partial_ones_are() {
    let app = app_with_events(3).await;
    let old_head = saved_audit_heads(&app).await;
    for i in 4..=5 {
        app.put(&tokens_path(&format!("u{i}"))).json(garth_body(&format!("u{i}"))).send().await;
    }
    assert_eq!(verify(&app).await["ok"], true);
    // Only the head restored from the older copy: the newer events are still there.
    restore_audit_heads(&app, &old_head).await;
    assert_broken_at(&verify(&app).await, 4);
    // Head and rows both as they were in the older copy: a consistent older state. Without an
    // external witness (a signed checkpoint kept elsewhere) this cannot be told apart from a log
    // that simply ended there.
    app.exec("DELETE FROM audit_events WHERE seq > 3").await;
    let r = verify(&app).await;
    assert_eq!((r["ok"].as_bool(), r["events_checked"].as_u64()), (Some(true), Some(3)), "{r}");
    // But an older head cannot be brought back over a purge: the events it vouches for are gone.
    let app = app_with_events(4).await;
    let pre_purge = saved_audit_heads(&app).await;
    let cutoff = app.audit().await[2].at;
    let p = audit::purge_before(app.db(), &app.state.keyring, cutoff).await.unwrap();
    assert_eq!((p.events, p.through_seq, p.stopped_at), (2, 2, None));
    assert_eq!(verify(&app).await["ok"], true);
    restore_audit_heads(&app, &pre_purge).await;
    app.exec("DELETE FROM audit_events WHERE seq > 4").await;
    assert_broken_at(&verify(&app).await, 1);
}

#[tokio::test]
async fn moving_the_retention_anchor_without_the_key_is_found() {
    // Deleting the oldest events and moving the anchor past them, as a purge would, needs the key.
    let app = app_with_events(4).await;
    app.exec("DELETE FROM audit_events WHERE seq <= 2").await;
    // The anchors of the emptied chains moved past their events, as a purge would, without the key.
    app.exec(
        "UPDATE audit_heads SET anchor_pos = last_pos, anchor_seq = last_seq, anchor_hmac = last_hmac \
         WHERE last_seq BETWEEN 1 AND 2",
    )
    .await;
    let r = verify(&app).await;
    assert_eq!(r["ok"], false, "{r}");
}

#[tokio::test]
async fn retention_purges_old_events_and_the_chain_still_verifies_from_the_oldest_retained_one() {
    let app = app_with_events(5).await;
    let cutoff = app.audit().await[3].at;
    let p = audit::purge_before(app.db(), &app.state.keyring, cutoff).await.unwrap();
    assert_eq!((p.events, p.through_seq, p.stopped_at), (3, 3, None));
    let log = app.audit().await;
    assert_eq!(log.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5, 6]);
    let purged = &log[2];
    assert_eq!((purged.type_.as_str(), purged.actor.as_deref()), ("audit.purged", Some("sweeper")));
    assert_eq!(details(purged)["events"], 3);
    assert_eq!(details(purged)["through_seq"], 3);
    let r = verify(&app).await;
    assert_eq!(
        (r["ok"].as_bool(), r["events_checked"].as_u64(), r["purged_through"].as_i64()),
        (Some(true), Some(3), Some(3)),
        "{r}"
    );
    assert_eq!(
        cli_verify(&app).await,
        (true, "audit chain ok: 3 events (events through seq 3 were purged by retention)".to_string())
    );
    // Tampering with a retained event is still found.
    app.exec(r#"UPDATE audit_events SET details = '{"kind":"garth","version":9}' WHERE seq = 4"#).await;
    let r = verify(&app).await;
    assert_broken_at(&r, 4);
    assert_eq!(r["purged_through"], 3);
    let (ok, out) = cli_verify(&app).await;
    assert!(!ok && out.starts_with("audit chain BROKEN at seq 4: "), "{out}");
    // A purge never removes an event that does not verify: it stops before it.
    let p = audit::purge_before(app.db(), &app.state.keyring, centraldb_mfa::store::now()).await.unwrap();
    assert_eq!((p.events, p.stopped_at), (0, Some(4)));
    assert_eq!(app.audit().await.first().map(|e| e.seq), Some(4), "the evidence is kept");
}

#[tokio::test]
async fn the_sweeper_purges_audit_events_past_the_retention_setting() {
    let app = TestApp::spawn_with(|v| {
        v.insert("CENTRALDB_AUDIT_RETENTION_DAYS".into(), "30".into());
    })
    .await;
    for i in 1..=3 {
        app.put(&tokens_path(&format!("u{i}"))).json(garth_body(&format!("u{i}"))).send().await;
    }
    let now = centraldb_mfa::store::now();
    let r = centraldb_mfa::sweeper::sweep_once(&app.state, now + chrono::Duration::days(29)).await.unwrap();
    assert_eq!(r.audit_purged, 0);
    let r = centraldb_mfa::sweeper::sweep_once(&app.state, now + chrono::Duration::days(31)).await.unwrap();
    // The 3 writes, and the 3 token.expired events this pass wrote first (their refresh tokens
    // ran out at 30 days; events carry the real time, before the cutoff).
    assert_eq!(r.audit_purged, 6);
    let log = app.audit().await;
    assert_eq!(log.iter().map(|e| (e.seq, e.type_.as_str())).collect::<Vec<_>>(), [(7, "audit.purged")]);
    let v = verify(&app).await;
    assert_eq!((v["ok"].as_bool(), v["events_checked"].as_u64()), (Some(true), Some(1)), "{v}");
    // Retention 0 keeps everything.
    let keep = TestApp::spawn_with(|v| {
        v.insert("CENTRALDB_AUDIT_RETENTION_DAYS".into(), "0".into());
    })
    .await;
    keep.put(&tokens_path("k")).json(garth_body("k")).send().await;
    let r = centraldb_mfa::sweeper::sweep_once(&keep.state, now + chrono::Duration::days(36_500)).await.unwrap();
    assert_eq!(r.audit_purged, 0);
}

#[tokio::test]
async fn a_head_without_a_mac_from_before_the_upgrade_is_sealed_at_the_next_start() {
    let app = app_with_events(3).await;
    app.exec("UPDATE audit_chain SET head_mac = NULL, head_key_id = NULL WHERE id = 1").await;
    let r = verify(&app).await;
    assert_eq!(r["ok"], false, "an unsealed head is reported: {r}");
    assert!(r["reason"].as_str().unwrap().contains("no MAC"), "{r}");
    // The next start (here: the CLI) seals it, since the events verify.
    assert_eq!(cli_verify(&app).await, (true, "audit chain ok: 3 events".to_string()));
    assert_eq!(verify(&app).await["ok"], true);
    // A head over a broken chain is not sealed.
    app.exec("UPDATE audit_chain SET head_mac = NULL, head_key_id = NULL WHERE id = 1").await;
    app.exec(r#"UPDATE audit_events SET details = '{}' WHERE seq = 2"#).await;
    let (ok, out) = cli_verify(&app).await;
    assert!(!ok && out.starts_with("audit chain BROKEN at seq 2: "), "{out}");
    assert_eq!(scalar_i64(&app, "SELECT COUNT(*) FROM audit_chain WHERE head_mac IS NULL").await, 1);
}
