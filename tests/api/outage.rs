//! Database trouble: the service answers 503 `unavailable` with `Retry-After` (never hangs past
//! the request timeout), `/readyz` says so, `/healthz` stays up, and it recovers by itself.

use std::{
    collections::HashMap,
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use centraldb_mfa::{AppState, api, config::Settings, crypto::Keyring, store::Db};
use secrecy::SecretString;
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinHandle},
};

use crate::helpers::*;

/// The request timeout the outage apps run with, and the acquire timeout of their pools.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const ACQUIRE_TIMEOUT_MS: &str = "1000";

/// A TCP proxy to the database that can be taken down (refusing new connections and cutting the
/// ones it forwards) and brought back up.
struct Proxy {
    port: u16,
    state: Arc<Mutex<ProxyState>>,
    /// While `true`, nothing is forwarded either way and new connections wait: a black hole
    /// (a partition, a frozen server) rather than a refusal.
    stalled: tokio::sync::watch::Sender<bool>,
    accept: JoinHandle<()>,
}

struct ProxyState {
    up: bool,
    conns: Vec<AbortHandle>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState { up: true, conns: Vec::new() }));
        let (stalled, stall_rx) = tokio::sync::watch::channel(false);
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { continue };
                // Checked and registered under the lock, so `down` cannot miss a connection.
                let mut st = shared.lock().unwrap();
                if !st.up {
                    drop(inbound);
                    continue;
                }
                let mut stall = stall_rx.clone();
                let task = tokio::spawn(async move {
                    let _ = stall.wait_for(|s| !*s).await;
                    let Ok(outbound) = TcpStream::connect(upstream).await else { return };
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::join!(pump(ir, ow, stall.clone()), pump(or, iw, stall));
                });
                st.conns.retain(|h| !h.is_finished());
                st.conns.push(task.abort_handle());
            }
        });
        Self { port, state, stalled, accept }
    }

    fn stall(&self, on: bool) {
        self.stalled.send_replace(on);
    }

    /// New connections are closed at once; forwarded ones are cut.
    fn down(&self) {
        let mut st = self.state.lock().unwrap();
        st.up = false;
        for h in st.conns.drain(..) {
            h.abort();
        }
    }

    fn up(&self) {
        self.state.lock().unwrap().up = true;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
        self.accept.abort();
    }
}

/// Copies one direction, holding every chunk while the proxy is stalled.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stall: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stall.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[track_caller]
fn assert_unavailable(r: &TestResponse, took: Duration) {
    r.assert_problem(503, "unavailable");
    let retry: u64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("503 without Retry-After: {:?}", r.headers))
        .parse()
        .expect("Retry-After is a number of seconds");
    assert!(retry >= 1, "Retry-After: {retry}");
    assert!(took < REQUEST_TIMEOUT + Duration::from_secs(1), "answered after {took:?}, past the request timeout");
    for leak in ["postgres", "sqlx", "SELECT", "127.0.0.1", "5432", "pool"] {
        assert!(!r.text.contains(leak), "the problem shows {leak}: {}", r.text);
    }
}

async fn timed(f: impl std::future::Future<Output = TestResponse>) -> (TestResponse, Duration) {
    let start = Instant::now();
    let r = f.await;
    (r, start.elapsed())
}

/// On the PostgreSQL pass: a proxy to the test server and an app on a fresh schema through it.
async fn app_behind_proxy(test: &str, tweak: impl FnOnce(&mut HashMap<String, String>)) -> Option<(Proxy, TestApp)> {
    if backend() != Backend::Postgres {
        eprintln!("{test}: runs with CENTRALDB_TEST_BACKEND=postgres");
        return None;
    }
    let opts = sqlx::postgres::PgConnectOptions::from_str(&postgres_url()).unwrap();
    let upstream = tokio::net::lookup_host((opts.get_host(), opts.get_port())).await.unwrap().next().unwrap();
    let proxy = Proxy::start(upstream).await;
    let (host_port, proxy_port) = (format!("{}:{}", opts.get_host(), opts.get_port()), proxy.port);
    let app = TestApp::spawn_with(|vars| {
        let url = vars["CENTRALDB_DATABASE_URL"].clone();
        assert!(url.contains(&host_port), "{url}");
        vars.insert("CENTRALDB_DATABASE_URL".into(), url.replacen(&host_port, &format!("127.0.0.1:{proxy_port}"), 1));
        vars.insert("CENTRALDB_DB_ACQUIRE_TIMEOUT_MS".into(), ACQUIRE_TIMEOUT_MS.into());
        vars.insert("CENTRALDB_REQUEST_TIMEOUT_SECS".into(), REQUEST_TIMEOUT.as_secs().to_string());
        tweak(vars);
    })
    .await;
    assert!(app.vars["CENTRALDB_DATABASE_URL"].contains(&format!(":{proxy_port}/")), "the app goes through the proxy");
    Some((proxy, app))
}

/// PostgreSQL behind a proxy that goes down and comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_answers_503_and_recovers() {
    let Some((proxy, app)) = app_behind_proxy("postgres_outage_answers_503_and_recovers", |_| {}).await else { return };
    let p = tokens_path("outage");
    let put = app.put(&p).json(garth_body("outage")).send().await;
    assert_eq!(put.status, 201, "{}", put.text);
    let before = app.get(&p).send().await;
    assert_eq!(before.status, 200, "{}", before.text);
    assert_eq!(app.get("/readyz").no_auth().send().await.status, 200);

    proxy.down();
    let (r, took) = timed(app.get(&p).send()).await;
    assert_unavailable(&r, took);
    assert!(!r.text.contains("SECRET"), "{}", r.text);
    let (r, took) = timed(app.put(&p).json(garth_body("outage-new")).send()).await;
    assert_unavailable(&r, took);
    let (r, took) = timed(app.post("/api/v1/sessions").json(json!({"user_id": "outage"})).send()).await;
    assert_unavailable(&r, took);
    let (r, took) = timed(app.get("/readyz").no_auth().send()).await;
    assert_unavailable(&r, took);
    let h = app.get("/healthz").no_auth().send().await;
    assert_eq!(h.status, 200, "the process is still up: {}", h.text);

    proxy.up();
    let start = Instant::now();
    let back = loop {
        let r = app.get(&p).send().await;
        if r.status == 200 {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still {} 5 s after the database came back: {}",
            r.status,
            r.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        back.json["oauth1_token"],
        oauth1("outage"),
        "the stored bundle, not the write refused during the outage"
    );
    assert_eq!(back.json["oauth2_token"], before.json["oauth2_token"]);
    assert_eq!(back.json["version"], 1);
    let ready = app.get("/readyz").no_auth().send().await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    // Writes work again, and the refused ones left no trace.
    let s = app.post("/api/v1/sessions").json(json!({"user_id": "outage"})).send().await;
    assert_eq!(s.status, 201, "{}", s.text);
    let events = app.audit().await;
    assert_eq!(events.iter().filter(|e| e.type_ == "session.created").count(), 1);
    assert_eq!(events.iter().filter(|e| e.type_ == "token.write").count(), 1);
    let v = centraldb_mfa::services::audit::verify(app.db(), &app.state.keyring).await.unwrap();
    assert!(v.ok, "{:?}", v.reason);
}

/// An app whose database is a PostgreSQL server that is not there (a port nothing listens on).
/// Runs on both test passes: it needs no database at all.
async fn app_without_database() -> TestApp {
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("postgres://postgres@127.0.0.1:{dead_port}/test");
    let dir = tempfile::tempdir().unwrap();
    let spec = key_spec("k1");
    let vars: HashMap<String, String> = [
        ("CENTRALDB_DATA_DIR", dir.path().display().to_string()),
        ("CENTRALDB_DATABASE_URL", url.clone()),
        ("CENTRALDB_ENCRYPTION_KEYS", spec.clone()),
        ("CENTRALDB_BOOTSTRAP_ADMIN_KEY", ADMIN_KEY.to_string()),
        ("CENTRALDB_DB_ACQUIRE_TIMEOUT_MS", ACQUIRE_TIMEOUT_MS.to_string()),
        ("CENTRALDB_REQUEST_TIMEOUT_SECS", REQUEST_TIMEOUT.as_secs().to_string()),
        ("CENTRALDB_ARGON2_MEMORY_KIB", "64".to_string()),
        ("CENTRALDB_ARGON2_ITERATIONS", "1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let pool =
        sqlx::postgres::PgPoolOptions::new().acquire_timeout(settings.db_acquire_timeout).connect_lazy(&url).unwrap();
    let keyring = Keyring::parse(&SecretString::from(spec)).unwrap();
    let state = AppState::new(Db::Postgres { pool }, keyring, settings).unwrap();
    TestApp { router: api::app(state.clone()), state, dir, db_url: url, vars }
}

#[tokio::test]
async fn an_unreachable_database_answers_503_quickly() {
    let app = app_without_database().await;
    let (r, took) = timed(app.get(&tokens_path("nobody")).send()).await;
    assert_unavailable(&r, took);
    let (r, took) = timed(app.put(&tokens_path("nobody")).json(garth_body("nobody")).send()).await;
    assert_unavailable(&r, took);
    let (r, took) = timed(app.post("/api/v1/sessions").json(json!({"user_id": "nobody"})).send()).await;
    assert_unavailable(&r, took);
    let (r, took) = timed(app.get("/api/v1/users/nobody/auth-status").key("cdbm_some_other_key").send()).await;
    assert_unavailable(&r, took);
    let (r, took) = timed(app.get("/readyz").no_auth().send()).await;
    assert_unavailable(&r, took);
    let h = app.get("/healthz").no_auth().send().await;
    assert_eq!(h.status, 200, "{}", h.text);
    assert_eq!(h.json["status"], "ok");
    // A request without any key is still refused as such (its audit row cannot be written).
    let (r, took) = timed(app.get(&tokens_path("nobody")).no_auth().send()).await;
    r.assert_problem(401, "unauthenticated");
    assert!(took < REQUEST_TIMEOUT + Duration::from_secs(1), "{took:?}");
}

/// Many requests at once against a database that is not there: every one is answered, each
/// within the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_during_an_outage_all_get_503() {
    let app = Arc::new(app_without_database().await);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let user = format!("c{i}");
            let (r, took) = timed(app.get(&tokens_path(&user)).send()).await;
            assert_unavailable(&r, took);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(start.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(2), "{:?}", start.elapsed());
}

/// A writer that holds the database (a long transaction in another process, say): requests that
/// need to write wait at most the request timeout, answer 503, and go through once it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_writer_answers_503_within_the_request_timeout_and_recovers() {
    let app = TestApp::spawn_with(|vars| {
        vars.insert("CENTRALDB_DB_ACQUIRE_TIMEOUT_MS".into(), ACQUIRE_TIMEOUT_MS.into());
        vars.insert("CENTRALDB_REQUEST_TIMEOUT_SECS".into(), REQUEST_TIMEOUT.as_secs().to_string());
    })
    .await;
    let p = tokens_path("held");
    assert_eq!(app.put(&p).json(garth_body("held")).send().await.status, 201);
    // Held by a writer of this user: since issue 16, writers of other users do not wait for it
    // on PostgreSQL (on SQLite this holds the one writer, as before).
    let held = app.db().begin_write_for(&["held"]).await.unwrap();
    let (r, took) = timed(app.put(&p).json(garth_body("held2")).send()).await;
    assert_unavailable(&r, took);
    let (r, took) = timed(app.post("/api/v1/sessions").json(json!({"user_id": "held"})).send()).await;
    assert_unavailable(&r, took);
    assert_eq!(app.get("/healthz").no_auth().send().await.status, 200);
    drop(held);
    let start = Instant::now();
    loop {
        let r = app.get(&p).send().await;
        if r.status == 200 {
            assert_eq!(r.json["version"], 1, "the refused write left nothing: {}", r.text);
            assert_eq!(r.json["oauth1_token"], oauth1("held"));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{} {}", r.status, r.text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = app.post("/api/v1/sessions").json(json!({"user_id": "held"})).send().await;
    assert_eq!(s.status, 201, "{}", s.text);
    assert_eq!(app.get("/readyz").no_auth().send().await.status, 200);
    let v = centraldb_mfa::services::audit::verify(app.db(), &app.state.keyring).await.unwrap();
    assert!(v.ok, "{:?}", v.reason);
}

/// PostgreSQL stops answering without closing anything (a partition, a frozen server): requests
/// end at the request timeout with 503, and everything resumes when the packets flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_database_is_bounded_by_the_request_timeout() {
    let Some((proxy, app)) = app_behind_proxy("a_silent_database_is_bounded_by_the_request_timeout", |_| {}).await
    else {
        return;
    };
    let p = tokens_path("silent");
    assert_eq!(app.put(&p).json(garth_body("silent")).send().await.status, 201);
    assert_eq!(app.get(&p).send().await.status, 200);

    proxy.stall(true);
    let (r, took) = timed(app.get(&p).send()).await;
    assert_unavailable(&r, took);
    let (r, took) = timed(app.put(&p).json(garth_body("silent-2")).send()).await;
    assert_unavailable(&r, took);
    let (r, took) = timed(app.get("/readyz").no_auth().send()).await;
    assert_unavailable(&r, took);
    assert_eq!(app.get("/healthz").no_auth().send().await.status, 200);

    proxy.stall(false);
    let start = Instant::now();
    loop {
        let r = app.get(&p).send().await;
        if r.status == 200 {
            assert_eq!(r.json["oauth1_token"], oauth1("silent"), "{}", r.text);
            assert_eq!(r.json["version"], 1, "the write that timed out was rolled back: {}", r.text);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{} {}", r.status, r.text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(app.get("/readyz").no_auth().send().await.status, 200);
    let s = app.post("/api/v1/sessions").json(json!({"user_id": "silent"})).send().await;
    assert_eq!(s.status, 201, "{}", s.text);
}

/// The states (`pg_stat_activity.state`) of the server sessions opened under `application_name`.
async fn server_session_states(application_name: &str) -> Vec<String> {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&postgres_url()).await.unwrap();
    sqlx::query_scalar("SELECT COALESCE(state, '') FROM pg_stat_activity WHERE application_name = $1")
        .bind(application_name)
        .fetch_all(&mut admin)
        .await
        .unwrap()
}

/// A request cut off by the request timeout while its `BEGIN` is in flight (a slow database) must
/// not leave its pooled connection inside a transaction: the next borrowers would run inside it
/// (holding its locks, never committing, failing a snapshot with `SET TRANSACTION ISOLATION LEVEL
/// must be called before any query`). One connection, so the next borrower is that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_cut_off_mid_begin_leaves_no_connection_inside_a_transaction() {
    let app_name = format!("cdbt_outage_{:016x}", rand::random::<u64>());
    let tweak = |vars: &mut HashMap<String, String>| {
        vars.insert("CENTRALDB_DB_MAX_CONNECTIONS".into(), "1".into());
        let url = vars["CENTRALDB_DATABASE_URL"].clone();
        let sep = if url.contains('?') { '&' } else { '?' };
        vars.insert("CENTRALDB_DATABASE_URL".into(), format!("{url}{sep}application_name={app_name}"));
    };
    let Some((proxy, app)) =
        app_behind_proxy("a_request_cut_off_mid_begin_leaves_no_connection_inside_a_transaction", tweak).await
    else {
        return;
    };
    let p = tokens_path("cutoff");
    assert_eq!(app.put(&p).json(garth_body("cutoff")).send().await.status, 201);
    assert_eq!(server_session_states(&app_name).await, vec!["idle"]);

    proxy.stall(true);
    let (r, took) = timed(app.get(&p).send()).await;
    assert_unavailable(&r, took);
    proxy.stall(false);
    let start = Instant::now();
    while app.get("/readyz").no_auth().send().await.status != 200 {
        assert!(start.elapsed() < Duration::from_secs(5), "not ready 5 s after the database came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let states = server_session_states(&app_name).await;
    let mut problems = Vec::new();
    if !states.iter().all(|s| s == "idle") {
        problems.push(format!("the app's connection is left inside the cancelled request's transaction: {states:?}"));
    }
    // What a caller then sees: the chain check, and ordinary requests after it.
    let v = app.get("/api/v1/audit/verify").send().await;
    if v.status != 200 || v.json["ok"] != true {
        problems.push(format!("GET /api/v1/audit/verify answers {} {}", v.status, v.text));
    }
    for path in [p.as_str(), "/readyz"] {
        let r = app.get(path).send().await;
        if r.status != 200 {
            problems.push(format!("then GET {path} answers {} {}", r.status, r.text));
        }
    }
    if !problems.is_empty() {
        // Does it heal by itself?
        let start = Instant::now();
        let mut last = app.get(&p).send().await;
        while last.status != 200 && start.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            last = app.get(&p).send().await;
        }
        if last.status != 200 {
            problems.push(format!("and GET {p} still answers {} 3 s later: it does not recover", last.status));
        }
    }
    assert!(problems.is_empty(), "after the outage: {problems:#?}");
}

/// A small tmpfs mounted for one test; unmounted (lazily if still busy) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (the test then has nothing to check) when no tmpfs can be mounted here. Under
    /// `CI=true` (`.ci/run` runs as root) a test that cannot run fails instead of passing.
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Self { dir }),
            Ok(o) => format!("cannot mount a tmpfs: {}", String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => format!("cannot run mount: {e}"),
        };
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true: this test must run, but {why}");
        eprintln!("SKIPPED: {why}");
        None
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the file system with `name`, leaving no free block.
    fn fill(&self, name: &str) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join(name)).unwrap();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) if chunk.len() > 512 => chunk.truncate(chunk.len() / 8),
                Err(_) => break,
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut c = std::process::Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            c.arg(self.dir.path()).status().is_ok_and(|s| s.success())
        };
        if !umount(false) {
            umount(true);
        }
    }
}

/// SQLite on a full disk: a write is refused with 507 `insufficient_storage` (the commit of the
/// group transaction fails with SQLITE_FULL, which used to come back as 503 `unavailable`), the
/// process stays up, nothing half-written remains, and writes work again once space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_disk_full_answers_507_and_recovers() {
    if backend() != Backend::Sqlite {
        eprintln!("sqlite_disk_full_answers_507_and_recovers: runs on the SQLite pass");
        return;
    }
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let url = format!("sqlite://{}", fs.path().join("full.db").display());
    let app = TestApp::spawn_with(|vars| {
        vars.insert("CENTRALDB_DATABASE_URL".into(), url.clone());
    })
    .await;
    let p = tokens_path("full");
    assert_eq!(app.put(&p).json(garth_body("full")).send().await.status, 201);

    fs.fill("filler");
    let mut refused = None;
    for i in 0..50 {
        let (r, took) = timed(app.put(&tokens_path(&format!("full{i}"))).json(garth_body("full-new")).send()).await;
        assert!(took < Duration::from_secs(5), "answered after {took:?}");
        if r.status != 201 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("50 writes succeeded on a full disk");
    r.assert_problem(507, "insufficient_storage");
    assert!(r.header("retry-after").is_some(), "507 without Retry-After: {:?}", r.headers);
    let r = app.put(&p).json(garth_body("full-2")).send().await;
    r.assert_problem(507, "insufficient_storage");
    assert_eq!(app.get("/healthz").no_auth().send().await.status, 200);
    let read = app.get(&p).send().await;
    assert!([200, 503, 507].contains(&read.status.as_u16()), "a read on a full disk: {} {}", read.status, read.text);

    std::fs::remove_file(fs.path().join("filler")).unwrap();
    let start = Instant::now();
    let back = loop {
        let r = app.put(&p).json(garth_body("full-3")).send().await;
        if r.status == 200 {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "still {} after space returned: {}", r.status, r.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(back.json["version"], 2, "the refused writes left nothing: {}", back.text);
    let r = app.get(&p).send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["oauth1_token"], oauth1("full-3"));
    let v = centraldb_mfa::services::audit::verify(app.db(), &app.state.keyring).await.unwrap();
    assert!(v.ok, "{:?}", v.reason);
    let mut rc = app.db().read().await.unwrap();
    let centraldb_mfa::store::ReadConn::Sqlite(c) = &mut rc else { unreachable!() };
    let integrity: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check").fetch_all(&mut **c).await.unwrap();
    assert_eq!(integrity, vec!["ok"]);
    drop(rc);
    app.db().close().await;
}
