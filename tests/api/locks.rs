//! Issue 16, item 1: login writes (sessions, MFA challenges) take only the lock of their user on
//! PostgreSQL, not a common one; and the per-user and service-wide limits stay exact when many
//! requests of one user (or of many users, for the service-wide cap) race over three instances
//! on one database. The exactly-once tests run on both backends.

use std::{collections::HashMap, sync::Arc, time::Duration};

use centraldb_mfa::{
    services::audit::{self, AuditContext, Outcome},
    store::{Conn, Db},
};
use serde_json::{Value, json};

use crate::helpers::*;

const CH: &str = "/api/v1/mfa/challenges";
/// Long enough for any step that is not waiting for a lock; far below the request timeout.
const STEP: Duration = Duration::from_secs(5);

fn external(user: &str, session: Option<&Value>) -> Value {
    let mut b = json!({"user_id": user, "method": "sms", "destination": "+1 555 123 1234", "verifier": "external",
                       "resume_state": "gAJ9cQAoWAUAAABsb2dpbnEBVRESUME-LOCKS"});
    if let Some(s) = session {
        b["session_id"] = s["id"].clone();
    }
    b
}

/// Sends one request and fails the test if it does not answer within `STEP`.
async fn within(what: &str, req: RequestBuilder<'_>) -> TestResponse {
    match tokio::time::timeout(STEP, req.send()).await {
        Ok(r) => r,
        Err(_) => panic!("{what} waited {STEP:?}: it queued behind another user's write"),
    }
}

/// One whole login of `user` (session, external challenge, attempt, result, consume, session
/// `authenticated`, cancel of a second challenge), each step bounded by `STEP`.
async fn login(app: &TestApp, user: &str) {
    let s = within("session create", app.post("/api/v1/sessions").json(json!({"user_id": user}))).await;
    assert_eq!(s.status, 201, "{}", s.text);
    let c = within("challenge create", app.post(CH).json(external(user, Some(&s.json)))).await;
    assert_eq!(c.status, 201, "{}", c.text);
    let id = c.json["id"].as_str().unwrap().to_string();
    let a = within("attempt", app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "123456"}))).await;
    assert_eq!(a.status, 201, "{}", a.text);
    let r = within("result", app.post(&format!("{CH}/{id}/attempts/1/result")).json(json!({"success": true}))).await;
    assert_eq!((r.status.as_u16(), r.json["status"].as_str()), (200, Some("verified")), "{}", r.text);
    let k = within("consume", app.post(&format!("{CH}/{id}/consume"))).await;
    assert_eq!(k.status, 200, "{}", k.text);
    let sid = s.json["id"].as_str().unwrap();
    let t = within(
        "session transition",
        app.post(&format!("/api/v1/sessions/{sid}/transition")).json(json!({"to": "authenticated"})),
    )
    .await;
    assert_eq!((t.status.as_u16(), t.json["state"].as_str()), (200, Some("authenticated")), "{}", t.text);
    let c2 = within("second challenge", app.post(CH).json(external(user, None))).await;
    assert_eq!(c2.status, 201, "{}", c2.text);
    let id2 = c2.json["id"].as_str().unwrap();
    let d = within("challenge cancel", app.delete(&format!("{CH}/{id2}"))).await;
    assert_eq!(d.status, 204, "{}", d.text);
}

/// A user whose audit chain differs from `other`'s (so the test is about locks, not about two
/// users sharing a chain head, which they may, by design).
fn user_on_another_chain(prefix: &str, other: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| audit::chain_of(Some(u), None, None) != audit::chain_of(Some(other), None, None))
        .unwrap()
}

/// PostgreSQL: while a transaction holds user A's lock, with A's audit chain head and A's
/// session row locked as A's own login write would, a whole login of user B completes, step by
/// step, without waiting; A's own next write waits for it, and goes through once it ends. The
/// same with a transaction holding the common write lock (as every session and MFA write did
/// before issue 16, and as API-key writes and refusal summaries still do): B's login does not
/// wait for it. Both fail on the old code (B's first step queues). SQLite has one writer: there
/// the test only checks the login and the audit chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_of_one_user_does_not_wait_for_another_users_write() {
    let app = TestApp::spawn().await;
    let a = "lk-a";
    let b = user_on_another_chain("lk-b", a);
    let a_session = app.new_session(a, None).await;
    if backend() == Backend::Sqlite {
        login(&app, &b).await;
        let v = audit::verify(app.db(), &app.state.keyring).await.unwrap();
        assert!(v.ok, "{:?}", v.reason);
        return;
    }

    // 1. A's write in progress: A's lock, A's chain head (an audit event), A's session row.
    let mut held = app.db().begin_write_for(&[a]).await.unwrap();
    audit::record(
        &mut held.conn(),
        &app.state.keyring,
        &AuditContext::system("test"),
        "test.held",
        Outcome::Success,
        Some(a),
        json!({}),
    )
    .await
    .unwrap();
    if let Conn::Postgres(pg) = held.conn() {
        let sid = uuid_of(&a_session["id"]);
        let n = sqlx::query("UPDATE sessions SET updated_at = updated_at WHERE id = $1")
            .bind(sid)
            .execute(&mut *pg)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(n, 1);
    }
    login(&app, &b).await;
    // A's own next write waits for A's open write, and completes once it commits.
    let app = Arc::new(app);
    let waiting = {
        let app = app.clone();
        tokio::spawn(async move { app.post("/api/v1/sessions").json(json!({"user_id": "lk-a"})).send().await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a write of the same user does not overtake the open one");
    held.commit().await.unwrap();
    let r = tokio::time::timeout(STEP, waiting).await.expect("A's write goes through once A's lock is free").unwrap();
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(app.session_state_in_db(uuid_of(&a_session["id"])).await.as_deref(), Some("superseded"));

    // 2. A writer holding the common lock (API keys, refusal summaries, retention purge).
    let held = app.db().begin_write().await.unwrap();
    login(&app, &b).await;
    login(&app, a).await;
    drop(held);

    let v = audit::verify(app.db(), &app.state.keyring).await.unwrap();
    assert!(v.ok, "{:?}", v.reason);
}

async fn scalar(db: &Db, sql: &str) -> i64 {
    match db {
        Db::Sqlite { pool, .. } => {
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(pool).await.unwrap()
        }
        Db::Postgres { pool } => {
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(pool).await.unwrap()
        }
    }
}

/// Three instances on one database, each with `tweak` applied.
async fn three_instances(tweak: impl Fn(&mut HashMap<String, String>) + Copy) -> Arc<[TestApp; 3]> {
    let first = TestApp::spawn_with(tweak).await;
    let same_db = |v: &mut HashMap<String, String>| {
        tweak(v);
        v.insert("CENTRALDB_DATABASE_URL".into(), first.db_url.clone());
        v.insert("CENTRALDB_ENCRYPTION_KEYS".into(), first.vars["CENTRALDB_ENCRYPTION_KEYS"].clone());
    };
    let second = TestApp::spawn_with(same_db).await;
    let third = TestApp::spawn_with(same_db).await;
    Arc::new([first, second, third])
}

/// Sends `n` requests at once, spread over the three instances; returns the statuses, sorted.
async fn at_once(
    apps: &Arc<[TestApp; 3]>,
    n: usize,
    req: impl Fn(&TestApp, usize) -> RequestBuilder<'_> + Send + Sync + Copy + 'static,
) -> Vec<u16> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let apps = apps.clone();
        set.spawn(async move { req(&apps[i % 3], i).send().await.status.as_u16() });
    }
    let mut statuses = set.join_all().await;
    statuses.sort_unstable();
    statuses
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// One user, three instances, requests at once: the per-user pending cap admits exactly its
/// number, a challenge is consumed exactly once, attempts stop exactly at `max_attempts`, and
/// concurrent new sessions leave exactly one active session (each supersedes the one before).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_users_limits_hold_exactly_across_three_instances() {
    let apps = three_instances(|_| {}).await;
    let user = "lk-one";

    // Per-user cap (3 pending): 12 creations at once.
    let st = at_once(&apps, 12, |app, _| app.post(CH).json(external("lk-one", None))).await;
    assert_eq!((count(&st, 201), count(&st, 429)), (3, 9), "{st:?}");
    let pending =
        scalar(apps[0].db(), "SELECT COUNT(*) FROM challenges WHERE user_id = 'lk-one' AND status = 'pending'").await;
    assert_eq!(pending, 3);
    for id in pending_ids(&apps[0], user).await {
        assert_eq!(apps[0].delete(&format!("{CH}/{id}")).send().await.status, 204);
    }

    // Attempts: max_attempts 3, 20 different codes at once.
    let mut body = external(user, None);
    body["max_attempts"] = json!(3);
    let r = apps[1].post(CH).json(body).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id: &'static str = Box::leak(r.json["id"].as_str().unwrap().to_string().into_boxed_str());
    let st = at_once(&apps, 20, move |app, i| {
        app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": format!("{:06}", 100_000 + i)}))
    })
    .await;
    assert_eq!((count(&st, 201), count(&st, 423)), (3, 17), "{st:?}");
    let sql = "SELECT COUNT(*) FROM challenge_attempts WHERE challenge_id = $1";
    let cid = uuid::Uuid::parse_str(id).unwrap();
    let n: i64 = match apps[0].db() {
        Db::Sqlite { pool, .. } => sqlx::query_scalar(sql).bind(cid).fetch_one(pool).await.unwrap(),
        Db::Postgres { pool } => sqlx::query_scalar(sql).bind(cid).fetch_one(pool).await.unwrap(),
    };
    assert_eq!(n, 3);
    let reserved = apps[0].audit().await.into_iter().filter(|e| e.type_ == "challenge.attempt").count();
    assert!(reserved >= 3, "{reserved}");

    // Consume: verified once, 20 consumes at once.
    let r = apps[2].post(&format!("{CH}/{id}/attempts/2/result")).json(json!({"success": true})).send().await;
    assert_eq!(r.json["status"], "verified", "{}", r.text);
    let st = at_once(&apps, 20, move |app, _| app.post(&format!("{CH}/{id}/consume"))).await;
    assert_eq!((count(&st, 200), count(&st, 409)), (1, 19), "{st:?}");
    let consumed = apps[0].audit().await.into_iter().filter(|e| e.type_ == "challenge.consumed").count();
    assert_eq!(consumed, 1);

    // Sessions: 10 new sessions at once; each supersedes the others, one stays active.
    let st = at_once(&apps, 10, |app, _| app.post("/api/v1/sessions").json(json!({"user_id": "lk-one"}))).await;
    assert_eq!(count(&st, 201), 10, "{st:?}");
    let active = scalar(
        apps[0].db(),
        "SELECT COUNT(*) FROM sessions WHERE user_id = 'lk-one' AND state IN ('started', 'mfa_required', 'mfa_verified')",
    )
    .await;
    assert_eq!(active, 1);
    let superseded =
        scalar(apps[0].db(), "SELECT COUNT(*) FROM sessions WHERE user_id = 'lk-one' AND state = 'superseded'").await;
    assert_eq!(superseded, 9);

    let v = audit::verify(apps[0].db(), &apps[0].state.keyring).await.unwrap();
    assert!(v.ok, "{:?}", v.reason);
}

async fn pending_ids(app: &TestApp, user: &str) -> Vec<uuid::Uuid> {
    let sql = "SELECT id FROM challenges WHERE user_id = $1 AND status = 'pending'";
    match app.db() {
        Db::Sqlite { pool, .. } => sqlx::query_scalar(sql).bind(user).fetch_all(pool).await.unwrap(),
        Db::Postgres { pool } => sqlx::query_scalar(sql).bind(user).fetch_all(pool).await.unwrap(),
    }
}

/// The service-wide cap (here 5) across users and instances: 15 creations of 15 users at once,
/// over three instances, admit exactly 5; the others get 503 and leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_service_wide_pending_cap_holds_exactly_across_three_instances() {
    let apps = three_instances(|v| {
        v.insert("CENTRALDB_MFA_MAX_PENDING_GLOBAL".into(), "5".into());
    })
    .await;
    let st = at_once(&apps, 15, |app, i| app.post(CH).json(external(&format!("lk-cap{i}"), None))).await;
    assert_eq!((count(&st, 201), count(&st, 503)), (5, 10), "{st:?}");
    assert_eq!(scalar(apps[0].db(), "SELECT COUNT(*) FROM challenges WHERE status = 'pending'").await, 5);
    let created = apps[0].audit().await.into_iter().filter(|e| e.type_ == "challenge.created").count();
    assert_eq!(created, 5);
}
