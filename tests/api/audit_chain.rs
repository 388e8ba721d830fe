//! The partitioned audit chain (issue 16): writers of different users across instances, every
//! tamper case inside one user's chain, a database from before the partitions, and signed
//! checkpoints (API, CLI, truncation and rewind with consistent heads, bad signatures).

use std::{collections::HashSet, sync::Arc, time::Duration};

use centraldb_mfa::{
    services::audit::{self, AuditContext, Checkpoint, LEGACY_CHAIN},
    store::{Db, audit::AuditRow},
};
use serde_json::{Value, json};

use crate::helpers::*;

const VERIFY: &str = "/api/v1/audit/verify";
const CHECKPOINT: &str = "/api/v1/audit/checkpoint";
const PUBLIC_KEY: &str = "/api/v1/audit/public-key";

async fn verify(app: &TestApp) -> Value {
    let r = app.get(VERIFY).send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json
}

#[track_caller]
fn assert_broken_at(report: &Value, seq: i64, chain: i64) {
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["first_bad_seq"], seq, "{report}");
    assert_eq!(report["first_bad_chain"], chain, "{report}");
    assert!(report["reason"].as_str().is_some_and(|r| !r.is_empty()), "{report}");
}

async fn scalar_i64(app: &TestApp, sql: &str) -> i64 {
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    match app.db() {
        Db::Sqlite { pool, .. } => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        Db::Postgres { pool } => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

fn chain(user: &str) -> i64 {
    audit::chain_of(Some(user), None, None)
}

/// Two users in different chains.
fn two_users() -> (&'static str, &'static str) {
    let (t, o) = ("tamper-t", "tamper-o");
    assert_ne!(chain(t), chain(o));
    (t, o)
}

/// Seven events alternating between user T (seq 1, 3, 5, 7: one chain, positions 1-4) and
/// user O (seq 2, 4, 6: another chain).
async fn interleaved() -> (TestApp, &'static str, &'static str) {
    let app = TestApp::spawn().await;
    let (t, o) = two_users();
    assert_eq!(app.put(&tokens_path(t)).json(garth_body(t)).send().await.status, 201);
    assert_eq!(app.put(&tokens_path(o)).json(garth_body(o)).send().await.status, 201);
    for _ in 0..2 {
        assert_eq!(app.get(&tokens_path(t)).send().await.status, 200);
        assert_eq!(app.get(&tokens_path(o)).send().await.status, 200);
    }
    assert_eq!(app.get(&tokens_path(t)).send().await.status, 200);
    let rows: Vec<(i64, Option<String>)> = app.audit().await.into_iter().map(|e| (e.seq, e.user_id)).collect();
    let users: Vec<&str> = rows.iter().map(|(_, u)| u.as_deref().unwrap()).collect();
    assert_eq!(users, [t, o, t, o, t, o, t]);
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
    let pos = scalar_i64(&app, &format!("SELECT MAX(pos) FROM audit_events WHERE chain_id = {}", chain(t))).await;
    assert_eq!(pos, 4, "T's four events are positions 1-4 of its chain");
    assert_eq!(verify(&app).await, json!({"ok": true, "events_checked": 7}));
    (app, t, o)
}

// ---- many writers, many instances -----------------------------------------------------------

/// Three instances on one database write for 24 users at once (writes and batched reads): every
/// request succeeds, each event has its own seq, events spread over many chains, and the whole
/// log verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_writing_at_once_leave_unique_seqs_and_valid_chains() {
    let first = TestApp::spawn().await;
    let same_db = |v: &mut std::collections::HashMap<String, String>| {
        v.insert("CENTRALDB_DATABASE_URL".into(), first.db_url.clone());
        v.insert("CENTRALDB_ENCRYPTION_KEYS".into(), first.vars["CENTRALDB_ENCRYPTION_KEYS"].clone());
    };
    let second = TestApp::spawn_with(same_db).await;
    let third = TestApp::spawn_with(same_db).await;
    let apps = Arc::new([first, second, third]);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..72 {
        let apps = apps.clone();
        set.spawn(async move {
            let user = format!("multi{}", i % 24);
            let app = &apps[i % 3];
            let w = app.put(&tokens_path(&user)).json(garth_body(&user)).send().await.status;
            let r = app.get(&tokens_path(&user)).send().await.status;
            (w, r)
        });
    }
    for (w, r) in set.join_all().await {
        assert!(w == 200 || w == 201, "{w}");
        assert_eq!(r, 200);
    }
    let events = apps[0].audit().await;
    assert_eq!(events.len(), 144, "one event per request");
    let seqs: HashSet<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs.len(), 144, "every seq is unique");
    let chains = scalar_i64(&apps[0], "SELECT COUNT(DISTINCT chain_id) FROM audit_events").await;
    assert!(chains > 10, "the events spread over {chains} chains");
    for app in apps.iter() {
        assert_eq!(verify(app).await, json!({"ok": true, "events_checked": 144}));
    }
}

/// A write transaction that has appended to one user's chain and not committed does not hold up
/// a write of a user in another chain (on the old single chain head, every write waited for it).
/// SQLite has one writer per database by design, so this is PostgreSQL's promise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_write_of_one_user_does_not_hold_up_another_users_write() {
    if backend() != Backend::Postgres {
        return;
    }
    let app = TestApp::spawn().await;
    let (t, o) = two_users();
    let mut tx = app.db().begin_write().await.unwrap();
    audit::record(
        &mut tx.conn(),
        &app.state.keyring,
        &AuditContext::system("test"),
        "test.open",
        audit::Outcome::Success,
        Some(t),
        json!({}),
    )
    .await
    .unwrap();
    let other = tokio::time::timeout(Duration::from_secs(10), app.put(&tokens_path(o)).json(garth_body(o)).send())
        .await
        .expect("the other user's write finished while the first transaction stayed open");
    assert_eq!(other.status, 201);
    tx.commit().await.unwrap();
    let log = app.audit().await;
    assert_eq!(log.len(), 2);
    assert_eq!(verify(&app).await["ok"], true);
}

/// On PostgreSQL an append draws its seq only once it holds its chain's head (one statement
/// locks the heads, then draws): a writer queued behind an open transaction on its chain gets a
/// seq above one drawn meanwhile in another chain, so within a chain seq grows with the position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_waiting_for_its_chain_head_draws_its_seq_after_it_holds_it() {
    if backend() != Backend::Postgres {
        return;
    }
    let app = Arc::new(TestApp::spawn().await);
    let (t, o) = two_users();
    let same = (0..100_000)
        .map(|i| format!("same-chain-{i}"))
        .find(|u| chain(u) == chain(t))
        .expect("a user in T's chain among the first 100,000 names");
    let mut tx = app.db().begin_write_for(&[t]).await.unwrap();
    let ctx = AuditContext::system("test");
    audit::record(&mut tx.conn(), &app.state.keyring, &ctx, "test.open", audit::Outcome::Success, Some(t), json!({}))
        .await
        .unwrap();
    let waiter = {
        let (app, same) = (app.clone(), same.clone());
        tokio::spawn(async move { app.put(&tokens_path(&same)).json(garth_body(&same)).send().await.status })
    };
    // Until the waiter's statement waits for the head row (or 5 s).
    let waiting = "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%audit_heads%'";
    for _ in 0..100 {
        if scalar_i64(&app, waiting).await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!waiter.is_finished(), "the writer in the same chain waited for the open transaction");
    assert_eq!(app.put(&tokens_path(o)).json(garth_body(o)).send().await.status, 201);
    tx.commit().await.unwrap();
    assert_eq!(waiter.await.unwrap(), 201);
    let seq_of = |events: &[AuditRow], user: &str| {
        events.iter().find(|e| e.user_id.as_deref() == Some(user) && e.type_ == "token.write").map(|e| e.seq)
    };
    let events = app.audit().await;
    let (drawn_meanwhile, waited) = (seq_of(&events, o).unwrap(), seq_of(&events, &same).unwrap());
    assert!(waited > drawn_meanwhile, "seq {waited} (waited for the head) must follow seq {drawn_meanwhile}");
    assert_eq!(verify(&app).await["ok"], true);
}

// ---- tampering inside one chain -------------------------------------------------------------

#[tokio::test]
async fn an_edit_in_the_middle_of_a_chain_names_its_seq_and_chain() {
    let (app, t, _) = interleaved().await;
    app.exec(r#"UPDATE audit_events SET details = '{"kind":"garth"}' WHERE seq = 3"#).await;
    let r = verify(&app).await;
    assert_broken_at(&r, 3, chain(t));
    assert_eq!(r["events_checked"], 2);
}

#[tokio::test]
async fn a_row_deleted_from_the_middle_of_a_chain_is_named() {
    let (app, t, _) = interleaved().await;
    app.exec("DELETE FROM audit_events WHERE seq = 3").await;
    let r = verify(&app).await;
    assert_broken_at(&r, 3, chain(t));
    assert!(r["reason"].as_str().unwrap().contains("missing"), "{r}");
    assert_eq!(r["events_checked"], 2);
}

/// The newest events of T's chain deleted and its head rewritten to match the new end: every
/// field consistent, but without the key its MAC does not verify. The first seq it no longer
/// vouches for is named.
#[tokio::test]
async fn deleting_a_chains_newest_events_with_a_consistent_head_rewrite_is_named() {
    let (app, t, _) = interleaved().await;
    app.exec("DELETE FROM audit_events WHERE seq IN (5, 7)").await;
    app.exec(&format!(
        "UPDATE audit_heads SET last_pos = 2, last_seq = 3, \
         last_hmac = (SELECT hmac FROM audit_events WHERE seq = 3) WHERE chain_id = {}",
        chain(t)
    ))
    .await;
    let r = verify(&app).await;
    assert_broken_at(&r, 5, chain(t));
    assert!(r["reason"].as_str().unwrap().contains("MAC"), "{r}");
    assert_eq!(r["events_checked"], 4);
}

#[tokio::test]
async fn reordering_events_within_a_chain_is_named() {
    let (app, t, _) = interleaved().await;
    // T's second and third events trade positions (their seals travel with them).
    let c = chain(t);
    app.exec(&format!("UPDATE audit_events SET pos = -2 WHERE chain_id = {c} AND pos = 2")).await;
    app.exec(&format!("UPDATE audit_events SET pos = 2 WHERE chain_id = {c} AND pos = 3")).await;
    app.exec(&format!("UPDATE audit_events SET pos = 3 WHERE chain_id = {c} AND pos = -2")).await;
    assert_broken_at(&verify(&app).await, 5, c);
    // Trading global seqs instead (across chains) is found too.
    let (app, t, _) = interleaved().await;
    app.exec("UPDATE audit_events SET seq = -4 WHERE seq = 4").await;
    app.exec("UPDATE audit_events SET seq = 4 WHERE seq = 5").await;
    app.exec("UPDATE audit_events SET seq = 5 WHERE seq = -4").await;
    assert_broken_at(&verify(&app).await, 4, chain(t));
}

#[tokio::test]
async fn inserting_an_event_is_named() {
    // A forged event appended to T's chain, the head moved to cover it (without the key).
    let (app, t, _) = interleaved().await;
    let new_id = match backend() {
        Backend::Sqlite => "randomblob(16)",
        Backend::Postgres => "gen_random_uuid()",
    };
    let c = chain(t);
    app.exec(&format!(
        "INSERT INTO audit_events (seq, id, at, type, outcome, user_id, actor, request_id, source_ip, details, \
         chain_id, pos, chain_key_id, hmac) SELECT 8, {new_id}, at, type, outcome, user_id, actor, request_id, \
         source_ip, details, chain_id, 5, chain_key_id, hmac FROM audit_events WHERE seq = 7"
    ))
    .await;
    app.exec(&format!("UPDATE audit_heads SET last_pos = 5, last_seq = 8 WHERE chain_id = {c}")).await;
    let r = verify(&app).await;
    assert_broken_at(&r, 8, c);
    assert_eq!(r["events_checked"], 7);
    // An event slipped in without a chain position (as if from before the partitions).
    let (app, _, _) = interleaved().await;
    app.exec(&format!(
        "INSERT INTO audit_events (seq, id, at, type, outcome, user_id, actor, request_id, source_ip, details, \
         chain_key_id, hmac) SELECT 8, {new_id}, at, type, outcome, user_id, actor, request_id, source_ip, details, \
         chain_key_id, hmac FROM audit_events WHERE seq = 7"
    ))
    .await;
    assert_broken_at(&verify(&app).await, 8, LEGACY_CHAIN);
}

/// A rolled-back write leaves a gap in the global seq on PostgreSQL (a sequence): not tampering.
#[tokio::test]
async fn a_gap_left_by_a_rolled_back_write_is_not_tampering() {
    let app = TestApp::spawn().await;
    app.put(&tokens_path("g1")).json(garth_body("g1")).send().await;
    {
        let mut tx = app.db().begin_write().await.unwrap();
        audit::record(
            &mut tx.conn(),
            &app.state.keyring,
            &AuditContext::system("test"),
            "test.rolled_back",
            audit::Outcome::Success,
            Some("g2"),
            json!({}),
        )
        .await
        .unwrap();
        drop(tx);
    }
    app.put(&tokens_path("g3")).json(garth_body("g3")).send().await;
    let seqs: Vec<i64> = app.audit().await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs.len(), 2);
    assert_eq!(verify(&app).await, json!({"ok": true, "events_checked": 2}));
}

// ---- a database from before the partitions --------------------------------------------------

/// Builds a database at migration 0007 holding the four events of
/// `tests/fixtures/audit-chain-vectors.json` (sealed by the old single-chain code, whose seals
/// Python reproduced) under the old head; then the service starts on it.
#[tokio::test]
async fn a_database_from_before_the_partitions_migrates_and_its_old_events_still_verify() {
    let doc: Value = serde_json::from_str(include_str!("../fixtures/audit-chain-vectors.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database_url(dir.path()).await;
    let events = doc["events"].as_array().unwrap().clone();
    let last_hmac = hex::decode(events.last().unwrap()["hmac_hex"].as_str().unwrap()).unwrap();
    let text = |v: &Value| v.as_str().map(str::to_string);
    macro_rules! old_database {
        ($pool:expr, $migrator:expr) => {{
            let pool = $pool;
            $migrator.run_to(7, &pool).await.unwrap();
            for e in &events {
                sqlx::query(
                    "INSERT INTO audit_events (seq, id, at, type, outcome, user_id, actor, request_id, source_ip, \
                     details, chain_key_id, hmac) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .bind(e["seq"].as_i64().unwrap())
                .bind(uuid::Uuid::parse_str(e["id"].as_str().unwrap()).unwrap())
                .bind(chrono::DateTime::parse_from_rfc3339(e["at"].as_str().unwrap()).unwrap().to_utc())
                .bind(text(&e["type"]))
                .bind(text(&e["outcome"]))
                .bind(text(&e["user_id"]))
                .bind(text(&e["actor"]))
                .bind(text(&e["request_id"]))
                .bind(text(&e["source_ip"]))
                .bind(text(&e["details"]))
                .bind("k1")
                .bind(hex::decode(e["hmac_hex"].as_str().unwrap()).unwrap())
                .execute(&pool)
                .await
                .unwrap();
            }
            sqlx::query("UPDATE audit_chain SET last_seq = 4, last_hmac = $1 WHERE id = 1")
                .bind(&last_hmac)
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }};
    }
    match backend() {
        Backend::Sqlite => {
            let opts: sqlx::sqlite::SqliteConnectOptions = url.parse::<sqlx::sqlite::SqliteConnectOptions>().unwrap();
            let pool = sqlx::SqlitePool::connect_with(opts.create_if_missing(true)).await.unwrap();
            old_database!(pool, sqlx::migrate!("migrations/sqlite"))
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            old_database!(pool, sqlx::migrate!("migrations/postgres"))
        }
    }
    let key = doc["key_spec"].as_str().unwrap().to_string();
    let spawn = |url: String, key: String| async move {
        TestApp::spawn_with(|v| {
            v.insert("CENTRALDB_DATABASE_URL".into(), url);
            v.insert("CENTRALDB_ENCRYPTION_KEYS".into(), key);
        })
        .await
    };
    let app = spawn(url.clone(), key.clone()).await;
    // Migrated in place: the old events are the legacy chain, their head sealed at start-up.
    assert_eq!(scalar_i64(&app, "SELECT COUNT(*) FROM audit_events WHERE chain_id IS NULL").await, 4);
    assert_eq!(scalar_i64(&app, "SELECT COUNT(*) FROM audit_chain WHERE head_mac IS NULL").await, 0);
    assert_eq!(verify(&app).await, json!({"ok": true, "events_checked": 4}));
    // New events go into the partitions and continue the seq.
    assert_eq!(app.put(&tokens_path("after")).json(garth_body("after")).send().await.status, 201);
    let last = app.audit().await.pop().unwrap();
    assert_eq!(last.seq, 5);
    assert_eq!(verify(&app).await, json!({"ok": true, "events_checked": 5}));
    // The checkpoint covers the legacy chain too.
    let cp = audit::checkpoint(app.db(), &app.state.keyring).await.unwrap();
    let legacy = cp.heads.iter().find(|h| h.chain == LEGACY_CHAIN).expect("the legacy head");
    assert_eq!((legacy.pos, legacy.seq), (4, 4));
    assert!(audit::verify_checkpoint(app.db(), &app.state.keyring, &cp).await.unwrap().ok);
    // Tampering with an old event is still found, in the legacy chain.
    app.exec("UPDATE audit_events SET request_id = 'forged' WHERE seq = 2").await;
    assert_broken_at(&verify(&app).await, 2, LEGACY_CHAIN);
    app.exec("UPDATE audit_events SET request_id = 'req-2' WHERE seq = 2").await;
    assert_eq!(verify(&app).await["ok"], true);
    // Rewrap re-seals both kinds under a new key; the old key can go.
    let both = format!("{},{key}", key_spec("k2"));
    let ring = centraldb_mfa::crypto::Keyring::parse(&secrecy::SecretString::from(both.clone())).unwrap();
    let report = centraldb_mfa::services::keys::rewrap(app.db(), &ring, &AuditContext::system("test")).await.unwrap();
    assert_eq!(report.audit_broken, None);
    assert_eq!(report.resealed, 5);
    let only_k2 = centraldb_mfa::crypto::Keyring::parse(&secrecy::SecretString::from(
        both.split(',').next().unwrap().to_string(),
    ))
    .unwrap();
    let r = audit::verify(app.db(), &only_k2).await.unwrap();
    assert!(r.ok && r.events_checked == 6, "{r:?}");
}

// ---- signed checkpoints ---------------------------------------------------------------------

async fn checkpoint(app: &TestApp) -> Checkpoint {
    let reader = app.key("audit:read").await;
    let r = app.get(CHECKPOINT).key(&reader).send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    serde_json::from_value(r.json).unwrap()
}

#[tokio::test]
async fn a_checkpoint_is_signed_over_every_head_and_verifies_while_the_log_grows() {
    let (app, t, o) = interleaved().await;
    let cp = checkpoint(&app).await;
    assert_eq!(cp.version, 1);
    assert_eq!(cp.key_id, "k1");
    assert_eq!(cp.partitions, 256);
    assert_eq!(cp.heads.len(), 256, "every chain (no legacy chain on a new database)");
    let head = cp.heads.iter().find(|h| h.chain == chain(t)).unwrap();
    assert_eq!((head.pos, head.seq), (4, 7));
    assert_eq!(cp.heads.iter().find(|h| h.chain == chain(o)).map(|h| (h.pos, h.seq)), Some((3, 6)));
    // The public key verifies it, and the API and the keyring agree on it.
    let reader = app.key("audit:read").await;
    let keys = app.get(PUBLIC_KEY).key(&reader).send().await;
    assert_eq!(keys.status, 200, "{}", keys.text);
    assert_eq!(keys.json["keys"][0]["key_id"], "k1");
    assert_eq!(keys.json["keys"][0]["algorithm"], "Ed25519");
    let pk = hex::decode(keys.json["keys"][0]["public_key"].as_str().unwrap()).unwrap();
    assert_eq!(pk.len(), 32);
    // Both need audit:read.
    let tokens_reader = app.key("tokens:read").await;
    app.get(CHECKPOINT).key(&tokens_reader).send().await.assert_problem(403, "forbidden");
    app.get(PUBLIC_KEY).no_auth().send().await.assert_problem(401, "unauthenticated");
    // More events later: the checkpoint still holds.
    for _ in 0..3 {
        app.get(&tokens_path(t)).send().await;
    }
    let r = audit::verify_checkpoint(app.db(), &app.state.keyring, &cp).await.unwrap();
    assert!(r.ok, "{r:?}");
}

/// The log restored from an older copy (rows and heads alike, consistent, so `verify` alone
/// cannot tell): a checkpoint taken before the restore names the chain and the seq it covered.
#[tokio::test]
async fn a_rewind_to_an_older_copy_is_found_by_a_later_checkpoint() {
    let (app, t, o) = interleaved().await;
    let old = saved_audit_heads(&app).await;
    app.get(&tokens_path(t)).send().await; // seq 8
    app.get(&tokens_path(o)).send().await; // seq 9
    let cp = checkpoint(&app).await;
    app.exec("DELETE FROM audit_events WHERE seq > 7").await;
    restore_audit_heads(&app, &old).await;
    assert_eq!(verify(&app).await, json!({"ok": true, "events_checked": 7}), "consistent: invisible from inside");
    let r = audit::verify_checkpoint(app.db(), &app.state.keyring, &cp).await.unwrap();
    assert!(!r.ok, "{r:?}");
    assert_eq!((r.first_bad_seq, r.first_bad_chain), (Some(8), Some(chain(t))), "{r:?}");
    assert!(r.reason.unwrap().contains("gone"));
}

/// Only one chain truncated (its newest events removed, its head put back consistently as it
/// was before them): found by the checkpoint, naming that chain.
#[tokio::test]
async fn a_truncated_chain_with_a_consistent_head_is_found_by_a_checkpoint() {
    let (app, _, o) = interleaved().await;
    let old = saved_audit_heads(&app).await;
    app.get(&tokens_path(o)).send().await; // seq 8
    app.get(&tokens_path(o)).send().await; // seq 9
    let cp = checkpoint(&app).await;
    app.exec("DELETE FROM audit_events WHERE seq IN (8, 9)").await;
    let c = chain(o);
    for sql in old.iter().filter(|s| s.ends_with(&format!("WHERE chain_id = {c}"))) {
        app.exec(sql).await;
    }
    assert_eq!(verify(&app).await["ok"], true);
    let r = audit::verify_checkpoint(app.db(), &app.state.keyring, &cp).await.unwrap();
    assert_eq!((r.ok, r.first_bad_seq, r.first_bad_chain), (false, Some(9), Some(c)), "{r:?}");
}

#[tokio::test]
async fn a_checkpoint_with_a_bad_signature_or_unknown_key_is_refused() {
    let (app, t, _) = interleaved().await;
    let cp = checkpoint(&app).await;
    // A head altered (e.g. to match a rewound log) breaks the signature.
    let mut forged = cp.clone();
    let h = forged.heads.iter_mut().find(|h| h.chain == chain(t)).unwrap();
    h.pos = 2;
    h.seq = 3;
    let r = audit::verify_checkpoint(app.db(), &app.state.keyring, &forged).await.unwrap();
    assert!(!r.ok && r.reason.as_deref().unwrap().contains("signature"), "{r:?}");
    // A flipped signature bit.
    let mut flipped = cp.clone();
    let mut sig = hex::decode(&flipped.signature).unwrap();
    sig[10] ^= 1;
    flipped.signature = hex::encode(sig);
    let r = audit::verify_checkpoint(app.db(), &app.state.keyring, &flipped).await.unwrap();
    assert!(!r.ok && r.reason.as_deref().unwrap().contains("signature"), "{r:?}");
    // Signed by another deployment's key of the same id.
    let other = centraldb_mfa::crypto::Keyring::parse(&secrecy::SecretString::from(key_spec("k1"))).unwrap();
    let r = audit::verify_checkpoint(app.db(), &other, &cp).await.unwrap();
    assert!(!r.ok, "{r:?}");
    // An unknown key id.
    let mut unknown = cp.clone();
    unknown.key_id = "k7".into();
    let r = audit::verify_checkpoint(app.db(), &app.state.keyring, &unknown).await.unwrap();
    assert!(!r.ok && r.reason.as_deref().unwrap().contains("'k7'"), "{r:?}");
    // The genuine one still verifies.
    assert!(audit::verify_checkpoint(app.db(), &app.state.keyring, &cp).await.unwrap().ok);
}

/// A checkpoint survives retention: events it covers that a purge removed are not reported.
#[tokio::test]
async fn a_checkpoint_still_verifies_after_a_retention_purge() {
    let (app, _, _) = interleaved().await;
    let cp = checkpoint(&app).await;
    let p = audit::purge_before(app.db(), &app.state.keyring, centraldb_mfa::store::now()).await.unwrap();
    assert_eq!((p.events, p.stopped_at), (7, None));
    assert_eq!(verify(&app).await["ok"], true);
    let r = audit::verify_checkpoint(app.db(), &app.state.keyring, &cp).await.unwrap();
    assert!(r.ok, "{r:?}");
}

// ---- the CLI ---------------------------------------------------------------------------------

#[tokio::test]
async fn the_cli_prints_keys_and_checkpoints_and_verifies_against_one() {
    let (app, t, _) = interleaved().await;
    let (ok, keys) = cli(&app, &["audit", "public-key"]).await;
    assert!(ok, "{keys}");
    let keys: Value = serde_json::from_str(&keys).unwrap();
    let reader = app.key("audit:read").await;
    assert_eq!(keys, app.get(PUBLIC_KEY).key(&reader).send().await.json, "the CLI and the API agree");
    let (ok, text) = cli(&app, &["audit", "checkpoint"]).await;
    assert!(ok, "{text}");
    let cp: Checkpoint = serde_json::from_str(&text).unwrap();
    assert!(audit::verify_checkpoint(app.db(), &app.state.keyring, &cp).await.unwrap().ok);
    let file = app.dir.path().join("checkpoint.json");
    std::fs::write(&file, &text).unwrap();
    let path = file.display().to_string();
    assert_eq!(cli(&app, &["audit", "verify", "--checkpoint", &path]).await, (true, "audit chain ok: 7 events".into()));
    // T's newest event removed and its head rewound consistently, with the key (a restore).
    let old_heads = saved_audit_heads(&app).await;
    app.get(&tokens_path(t)).send().await; // seq 8, then a checkpoint covering it
    let (_, text) = cli(&app, &["audit", "checkpoint"]).await;
    std::fs::write(&file, &text).unwrap();
    app.exec("DELETE FROM audit_events WHERE seq = 8").await;
    restore_audit_heads(&app, &old_heads).await;
    assert!(cli(&app, &["audit", "verify"]).await.0, "consistent: plain verify passes");
    let (ok, out) = cli(&app, &["audit", "verify", "--checkpoint", &path]).await;
    assert!(!ok, "{out}");
    assert!(out.starts_with("audit chain BROKEN at seq 8: "), "{out}");
    assert!(out.ends_with(&format!("[chain {}]", chain(t))), "{out}");
    // A tampered checkpoint file is refused.
    let mut doc: Value = serde_json::from_str(&text).unwrap();
    doc["at"] = json!("2020-01-01T00:00:00.000000Z");
    std::fs::write(&file, doc.to_string()).unwrap();
    let (ok, out) = cli(&app, &["audit", "verify", "--checkpoint", &path]).await;
    assert!(!ok && out.contains("signature"), "{out}");
    std::fs::write(&file, "not json").unwrap();
    let (ok, _) = cli(&app, &["audit", "verify", "--checkpoint", &path]).await;
    assert!(!ok);
}
