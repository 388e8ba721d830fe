//! Test harness: a fresh database per test (a temp SQLite file, or a fresh PostgreSQL schema),
//! the app router driven with `oneshot`, and raw access to the database for assertions.
//!
//! The backend comes from `CENTRALDB_TEST_BACKEND` (`sqlite`, the default, or `postgres`, with
//! `CENTRALDB_TEST_POSTGRES_URL`); `./scripts/test` runs the suite once per backend.

#![allow(dead_code)]

use std::{collections::HashMap, path::Path, str::FromStr, sync::OnceLock};

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, Method, Request, StatusCode},
};
use centraldb_mfa::{
    AppState, api,
    config::Settings,
    domain::Scopes,
    services::api_keys,
    startup,
    store::{self, Db, audit::AuditRow},
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tempfile::TempDir;
use tower::ServiceExt;

pub const ADMIN_KEY: &str = "test-bootstrap-admin-key-0123456789abcdef";

// ---- whole-suite log capture and the secret registry ----------------------------------------
//
// With `CENTRALDB_TEST_LOG_DIR` set (`./scripts/test` sets it), this test process logs everything
// (this crate, sqlx, hyper, tower_http, axum, ...) at `trace` into `<dir>/inproc-<pid>.log`, the
// real-binary tests run the binary at `trace` and append its output to `<dir>/binary-<pid>.log`,
// and every secret the suite creates or sends is appended, one JSON string per line, to
// `<dir>/secrets-<pid>.txt`. `scripts/scan-logs.py` then counts the secrets found in the logs.

/// The log directory of a scanning run, if any.
pub fn log_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("CENTRALDB_TEST_LOG_DIR").filter(|v| !v.is_empty()).map(std::path::PathBuf::from)
}

/// Installs the trace-level file subscriber once per process (no-op without a log directory).
pub fn test_logging() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let Some(dir) = log_dir() else { return };
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("inproc-{}.log", std::process::id()));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        use tracing_subscriber::prelude::*;
        // No timestamps: their microsecond digits would look like 6-digit codes to the scanner.
        let layer =
            tracing_subscriber::fmt::layer().with_ansi(false).without_time().with_writer(std::sync::Mutex::new(file));
        let _ = tracing_subscriber::registry().with(tracing_subscriber::EnvFilter::new("trace")).with(layer).try_init();
        secret(ADMIN_KEY);
    });
}

/// Registers a secret the suite uses: it must never appear in any log line. Returns it.
pub fn secret(s: &str) -> &str {
    static FILE: OnceLock<Option<std::sync::Mutex<std::fs::File>>> = OnceLock::new();
    let file = FILE.get_or_init(|| {
        let dir = log_dir()?;
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("secrets-{}.txt", std::process::id()));
        Some(std::sync::Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap()))
    });
    if let Some(f) = file.as_ref().filter(|_| !s.is_empty()) {
        use std::io::Write;
        let line = format!("{}\n", Value::String(s.to_string()));
        f.lock().unwrap_or_else(|e| e.into_inner()).write_all(line.as_bytes()).unwrap();
    }
    s
}

/// Registers an encryption key (base64, as configured) and its hex form.
pub fn secret_key(b64: &str) {
    use base64::Engine;
    secret(b64);
    if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
        secret(&hex::encode(raw));
    }
}

/// Registers every secret-bearing string field of a JSON document (request or response).
pub fn secrets_in(v: &Value) {
    const FIELDS: [&str; 11] = [
        "code",
        "resume_state",
        "oauth_token",
        "oauth_token_secret",
        "access_token",
        "refresh_token",
        "mfa_token",
        "di_token",
        "di_refresh_token",
        "di_client_id",
        "garth_dump",
    ];
    if log_dir().is_none() {
        return;
    }
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x {
                    Value::String(s) if FIELDS.contains(&k.as_str()) => {
                        secret(s);
                    }
                    _ => secrets_in(x),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(secrets_in),
        _ => {}
    }
}

/// Appends captured output of a real-binary run to `<dir>/binary-<pid>.log`.
pub fn append_binary_log(text: &str) {
    static FILE: OnceLock<Option<std::sync::Mutex<std::fs::File>>> = OnceLock::new();
    let file = FILE.get_or_init(|| {
        let dir = log_dir()?;
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("binary-{}.log", std::process::id()));
        Some(std::sync::Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap()))
    });
    if let Some(f) = file {
        use std::io::Write;
        let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all(text.as_bytes()).unwrap();
        if !text.ends_with('\n') {
            f.write_all(b"\n").unwrap();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn backend() -> Backend {
    match std::env::var("CENTRALDB_TEST_BACKEND").as_deref() {
        Ok("postgres") => Backend::Postgres,
        Ok("sqlite") | Err(_) => Backend::Sqlite,
        Ok(other) => panic!("CENTRALDB_TEST_BACKEND must be sqlite or postgres, not {other}"),
    }
}

pub fn postgres_url() -> String {
    std::env::var("CENTRALDB_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A random 256-bit key spec for the keyring.
pub fn key_spec(id: &str) -> String {
    use base64::Engine;
    test_logging();
    let raw = rand::random::<[u8; 32]>();
    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
    secret(&b64);
    secret(&hex::encode(raw));
    format!("{id}:{b64}")
}

/// A fresh, empty database: its URL (with its own schema on PostgreSQL).
pub async fn fresh_database_url(dir: &Path) -> String {
    match backend() {
        Backend::Sqlite => format!("sqlite://{}", dir.join("test.db").display()),
        Backend::Postgres => {
            let base = postgres_url();
            let mut admin = PgConnection::connect(&base)
                .await
                .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at CENTRALDB_TEST_POSTGRES_URL: {e}"));
            drop_stale_schemas(&mut admin).await;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            let schema = format!("cdbt_{now}_{:016x}", rand::random::<u64>());
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut admin).await.unwrap();
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}options=-c%20search_path%3D{schema}")
        }
    }
}

/// Schemas of earlier runs (older than an hour) are dropped once per test process.
async fn drop_stale_schemas(admin: &mut PgConnection) {
    static DONE: OnceLock<()> = OnceLock::new();
    if DONE.set(()).is_err() {
        return;
    }
    let cutoff = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 3600;
    let names: Vec<String> = sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'cdbt\\_%'")
        .fetch_all(&mut *admin)
        .await
        .unwrap_or_default();
    for n in names {
        let ts = n.split('_').nth(1).and_then(|t| t.parse::<u64>().ok()).unwrap_or(u64::MAX);
        if ts < cutoff {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {n} CASCADE")))
                .execute(&mut *admin)
                .await;
        }
    }
}

pub struct TestApp {
    pub router: Router,
    pub state: AppState,
    pub dir: TempDir,
    pub db_url: String,
    pub vars: HashMap<String, String>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Builds an app on a fresh database; `tweak` may change the environment it is built from.
    pub async fn spawn_with(tweak: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        test_logging();
        let dir = tempfile::tempdir().unwrap();
        let db_url = fresh_database_url(dir.path()).await;
        let mut vars: HashMap<String, String> = [
            ("CENTRALDB_DATA_DIR", dir.path().display().to_string()),
            ("CENTRALDB_DATABASE_URL", db_url.clone()),
            ("CENTRALDB_ENCRYPTION_KEYS", key_spec("k1")),
            ("CENTRALDB_BOOTSTRAP_ADMIN_KEY", ADMIN_KEY.to_string()),
            ("CENTRALDB_DB_MAX_CONNECTIONS", "4".to_string()),
            // Cheap argon2 keeps the suite fast; `mfa::default_argon2_parameters_are_owasp` checks the real ones.
            ("CENTRALDB_ARGON2_MEMORY_KIB", "64".to_string()),
            ("CENTRALDB_ARGON2_ITERATIONS", "1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        tweak(&mut vars);
        for part in vars.get("CENTRALDB_ENCRYPTION_KEYS").map(|v| v.split(',').collect::<Vec<_>>()).unwrap_or_default()
        {
            secret_key(part.split_once(':').map_or(part, |(_, key)| key));
        }
        if let Some(k) = vars.get("CENTRALDB_BOOTSTRAP_ADMIN_KEY") {
            secret(k);
        }
        let settings = Settings::from_lookup(|k| vars.get(k).cloned()).unwrap();
        let state = startup::build_state(settings).await.unwrap();
        Self { router: api::app(state.clone()), state, dir, db_url, vars }
    }

    pub fn db(&self) -> &Db {
        &self.state.db
    }

    /// A new API key with these scopes.
    pub async fn key(&self, scopes: &str) -> String {
        let (_, key) = api_keys::create(self.db(), "test", &Scopes::parse_list(scopes).unwrap()).await.unwrap();
        secret(&key).to_string()
    }

    pub fn request(&self, method: Method, uri: &str) -> RequestBuilder<'_> {
        RequestBuilder {
            app: self,
            method,
            uri: uri.to_string(),
            headers: vec![("authorization".into(), format!("Bearer {ADMIN_KEY}"))],
            body: None,
            peer: self.peer(),
        }
    }

    /// The peer address this app's requests come from (as the real server's `ConnectInfo`
    /// gives it): one per app, so audit events name a `source_ip` a test can predict.
    pub fn peer(&self) -> std::net::SocketAddr {
        peer_of(self.dir.path())
    }
    pub fn get(&self, uri: &str) -> RequestBuilder<'_> {
        self.request(Method::GET, uri)
    }
    pub fn put(&self, uri: &str) -> RequestBuilder<'_> {
        self.request(Method::PUT, uri)
    }
    pub fn post(&self, uri: &str) -> RequestBuilder<'_> {
        self.request(Method::POST, uri)
    }
    pub fn delete(&self, uri: &str) -> RequestBuilder<'_> {
        self.request(Method::DELETE, uri)
    }

    /// Every audit event so far, in order.
    pub async fn audit(&self) -> Vec<AuditRow> {
        let mut c = self.db().read().await.unwrap();
        store::audit::list_after(&mut c.conn(), 0, 100_000).await.unwrap()
    }

    /// Runs a raw SQL statement (test set-up and tampering).
    pub async fn exec(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match self.db() {
            Db::Sqlite { pool, .. } => {
                sqlx::query(sql).execute(pool).await.unwrap();
            }
            Db::Postgres { pool } => {
                sqlx::query(sql).execute(pool).await.unwrap();
            }
        }
    }

    pub async fn ciphertext(&self, user: &str) -> Option<Vec<u8>> {
        let sql = "SELECT ciphertext FROM token_bundles WHERE user_id = $1";
        match self.db() {
            Db::Sqlite { pool, .. } => sqlx::query_scalar(sql).bind(user).fetch_one(pool).await.unwrap(),
            Db::Postgres { pool } => sqlx::query_scalar(sql).bind(user).fetch_one(pool).await.unwrap(),
        }
    }

    pub async fn set_ciphertext(&self, user: &str, ct: &[u8]) {
        let sql = "UPDATE token_bundles SET ciphertext = $2 WHERE user_id = $1";
        match self.db() {
            Db::Sqlite { pool, .. } => {
                sqlx::query(sql).bind(user).bind(ct).execute(pool).await.unwrap();
            }
            Db::Postgres { pool } => {
                sqlx::query(sql).bind(user).bind(ct).execute(pool).await.unwrap();
            }
        }
    }

    /// Everything the database holds, as bytes to search: on SQLite the database file and its
    /// WAL as they are on disk; on PostgreSQL every row of every table as text.
    pub async fn raw_database(&self) -> Vec<u8> {
        match self.db() {
            Db::Sqlite { .. } => {
                let path = self.dir.path().join("test.db");
                let mut bytes = std::fs::read(&path).unwrap();
                for ext in ["-wal", "-shm"] {
                    let p = format!("{}{ext}", path.display());
                    if let Ok(b) = std::fs::read(p) {
                        bytes.extend(b);
                    }
                }
                bytes
            }
            Db::Postgres { pool } => {
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema()",
                )
                .fetch_all(pool)
                .await
                .unwrap();
                let mut out = Vec::new();
                for t in tables {
                    let rows: Vec<String> =
                        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT t::text FROM \"{t}\" t")))
                            .fetch_all(pool)
                            .await
                            .unwrap();
                    for r in rows {
                        out.extend(r.into_bytes());
                        out.push(b'\n');
                    }
                }
                out
            }
        }
    }
}

pub fn contains(haystack: &[u8], needle: &str) -> bool {
    let n = needle.as_bytes();
    let hex = hex::encode(n);
    haystack.windows(n.len()).any(|w| w == n) || haystack.windows(hex.len()).any(|w| w == hex.as_bytes())
}

pub struct RequestBuilder<'a> {
    app: &'a TestApp,
    method: Method,
    uri: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    peer: std::net::SocketAddr,
}

/// A peer address in 10.0.0.0/8 (and a port) derived from a per-app path: distinct per app.
fn peer_of(dir: &Path) -> std::net::SocketAddr {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    let [a, b, c, d, e, ..] = h.finish().to_be_bytes();
    let ip = std::net::Ipv4Addr::new(10, a, b, c.max(1));
    std::net::SocketAddr::from((ip, 1024 + u16::from_be_bytes([d, e]) % 60_000))
}

impl RequestBuilder<'_> {
    pub fn key(mut self, key: &str) -> Self {
        secret(key);
        self.headers.retain(|(k, _)| k != "authorization");
        self.headers.push(("authorization".into(), format!("Bearer {key}")));
        self
    }
    pub fn no_auth(mut self) -> Self {
        self.headers.retain(|(k, _)| k != "authorization");
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_lowercase(), v.to_string()));
        self
    }
    pub fn json(mut self, v: Value) -> Self {
        secrets_in(&v);
        self.headers.push(("content-type".into(), "application/json".into()));
        self.body = Some(serde_json::to_vec(&v).unwrap());
        self
    }
    pub fn raw_body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        self.headers.push(("content-type".into(), content_type.into()));
        self.body = Some(body.into());
        self
    }
    /// Sends the request from this peer address instead of the app's own.
    pub fn peer(mut self, peer: std::net::SocketAddr) -> Self {
        self.peer = peer;
        self
    }
    pub async fn send(self) -> TestResponse {
        let mut req = Request::builder().method(self.method).uri(&self.uri);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let mut req = req.body(self.body.map(Body::from).unwrap_or_else(Body::empty)).unwrap();
        req.extensions_mut().insert(axum::extract::ConnectInfo(self.peer));
        self.app.send_request(req).await
    }
}

impl TestApp {
    /// Sends a request built by hand (tests/props.rs builds arbitrary header bytes).
    pub async fn send_request(&self, req: Request<Body>) -> TestResponse {
        let is_openapi = req.uri().path() == "/openapi.json";
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        // A problem's `code` is an error code, not a secret; nor is anything in the OpenAPI
        // document (its examples hold problem `code`s such as `unavailable`, which log lines
        // rightly contain).
        if headers.get("content-type").is_none_or(|v| v != "application/problem+json") && !is_openapi {
            secrets_in(&json);
        }
        TestResponse { status, headers, text: String::from_utf8_lossy(&bytes).into_owned(), json }
    }
}

#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
    pub json: Value,
}

impl TestResponse {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).and_then(|v| v.to_str().ok())
    }
    /// Asserts a problem+json answer with this status and code.
    #[track_caller]
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "body: {}", self.text);
        assert_eq!(self.json["code"], code, "body: {}", self.text);
        assert_eq!(self.json["status"], status);
        for f in ["type", "title", "detail"] {
            assert!(self.json[f].is_string(), "problem lacks {f}: {}", self.text);
        }
    }
}

// ---- token fixtures -----------------------------------------------------------------------

pub fn oauth1(tag: &str) -> Value {
    secret(&format!("o1tok-{tag}-SECRET"));
    secret(&format!("o1sec-{tag}-SECRET"));
    json!({"oauth_token": format!("o1tok-{tag}-SECRET"), "oauth_token_secret": format!("o1sec-{tag}-SECRET"),
           "mfa_token": null, "mfa_expiration_timestamp": null, "domain": "garmin.com",
           "custom_field": {"kept": true}})
}

pub fn oauth2_with(tag: &str, expires_at: i64, refresh_expires_at: i64) -> Value {
    secret(&format!("acc-{tag}-SECRET"));
    secret(&format!("ref-{tag}-SECRET"));
    json!({"scope": "CONNECT_READ CONNECT_WRITE", "jti": format!("jti-{tag}"), "token_type": "Bearer",
           "access_token": format!("acc-{tag}-SECRET"), "refresh_token": format!("ref-{tag}-SECRET"),
           "expires_in": 86400, "expires_at": expires_at, "refresh_token_expires_in": 2_592_000,
           "refresh_token_expires_at": refresh_expires_at})
}

pub fn future(secs: i64) -> i64 {
    chrono::Utc::now().timestamp() + secs
}

pub fn oauth2(tag: &str) -> Value {
    oauth2_with(tag, future(86_400), future(2_592_000))
}

pub fn garth_body(tag: &str) -> Value {
    json!({"kind": "garth", "oauth1_token": oauth1(tag), "oauth2_token": oauth2(tag)})
}

/// The secret strings a `garth_body(tag)` carries.
pub fn garth_secrets(tag: &str) -> Vec<String> {
    ["o1tok", "o1sec", "acc", "ref"].iter().map(|p| format!("{p}-{tag}-SECRET")).collect()
}

pub fn jwt(exp: i64, tag: &str) -> String {
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    let t = format!("{}.{}.sig-{tag}", b64(&json!({"alg": "RS256"})), b64(&json!({"exp": exp, "sub": tag})));
    secret(&t);
    t
}

pub fn tokens_path(user: &str) -> String {
    format!("/api/v1/users/{user}/tokens")
}

/// Used by binary tests: a URL-safe `PgConnectOptions` check that the test URL parses.
pub fn assert_pg_url_parses(url: &str) {
    sqlx::postgres::PgConnectOptions::from_str(url).unwrap();
}

// ---- sessions, challenges, sweeper ----------------------------------------------------------

/// A UUID from a JSON string field.
pub fn uuid_of(v: &Value) -> uuid::Uuid {
    uuid::Uuid::parse_str(v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))).unwrap()
}

/// An RFC 3339 time from a JSON string field.
pub fn time_of(v: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a string: {v}")))
        .unwrap_or_else(|e| panic!("{v} is not RFC 3339: {e}"))
        .with_timezone(&chrono::Utc)
}

/// An audit event's `details`, parsed.
pub fn details(e: &AuditRow) -> Value {
    serde_json::from_str(&e.details).unwrap_or_else(|err| panic!("details are not JSON ({err}): {}", e.details))
}

impl TestApp {
    /// The session's `state` column as stored (no read-time expiry), `None` when the row is gone.
    pub async fn session_state_in_db(&self, id: uuid::Uuid) -> Option<String> {
        let sql = "SELECT state FROM sessions WHERE id = $1";
        match self.db() {
            Db::Sqlite { pool, .. } => sqlx::query_scalar(sql).bind(id).fetch_optional(pool).await.unwrap(),
            Db::Postgres { pool } => sqlx::query_scalar(sql).bind(id).fetch_optional(pool).await.unwrap(),
        }
    }

    /// The challenge's stored `status` and `resume_state`, `None` when the row is gone.
    pub async fn challenge_in_db(&self, id: uuid::Uuid) -> Option<(String, Option<Vec<u8>>)> {
        let sql = "SELECT status, resume_state FROM challenges WHERE id = $1";
        match self.db() {
            Db::Sqlite { pool, .. } => sqlx::query_as(sql).bind(id).fetch_optional(pool).await.unwrap(),
            Db::Postgres { pool } => sqlx::query_as(sql).bind(id).fetch_optional(pool).await.unwrap(),
        }
    }

    /// Starts a login session for `user` (admin key), asserting 201.
    pub async fn new_session(&self, user: &str, ttl_seconds: Option<i64>) -> Value {
        let mut body = json!({"user_id": user});
        if let Some(t) = ttl_seconds {
            body["ttl_seconds"] = json!(t);
        }
        let r = self.post("/api/v1/sessions").json(body).send().await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.json
    }

    /// Creates a service-verified e-mail challenge for `user` (linked to `session` when given),
    /// asserting 201.
    pub async fn new_challenge(&self, user: &str, session: Option<&Value>) -> Value {
        let mut body =
            json!({"user_id": user, "method": "email", "destination": "j@example.com", "verifier": "service"});
        if let Some(s) = session {
            body["session_id"] = s["id"].clone();
        }
        let r = self.post("/api/v1/mfa/challenges").json(body).send().await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.json
    }
}

// ---- audit tampering --------------------------------------------------------------------------

/// Every audit head row as SQL statements, to put back later (an older copy of the database).
pub async fn saved_audit_heads(app: &TestApp) -> Vec<String> {
    let sql = "SELECT chain_id, last_pos, last_seq, last_hmac, anchor_pos, anchor_seq, anchor_hmac, head_key_id, head_mac \
               FROM audit_heads";
    type Head = (i64, i64, i64, Vec<u8>, i64, i64, Vec<u8>, Option<String>, Option<Vec<u8>>);
    let heads: Vec<Head> = match app.db() {
        Db::Sqlite { pool, .. } => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
        Db::Postgres { pool } => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
    };
    let blob = |b: &[u8]| match backend() {
        Backend::Sqlite => format!("X'{}'", hex::encode(b)),
        Backend::Postgres => format!("decode('{}', 'hex')", hex::encode(b)),
    };
    heads
        .into_iter()
        .map(|h| {
            format!(
                "UPDATE audit_heads SET last_pos = {}, last_seq = {}, last_hmac = {}, anchor_pos = {}, anchor_seq = {}, \
                 anchor_hmac = {}, head_key_id = '{}', head_mac = {} WHERE chain_id = {}",
                h.1,
                h.2,
                blob(&h.3),
                h.4,
                h.5,
                blob(&h.6),
                h.7.unwrap(),
                blob(&h.8.unwrap()),
                h.0
            )
        })
        .collect()
}

/// Puts back every head row [`saved_audit_heads`] saved.
pub async fn restore_audit_heads(app: &TestApp, saved: &[String]) {
    for sql in saved {
        app.exec(sql).await;
    }
}

// ---- the CLI ---------------------------------------------------------------------------------

/// The real binary (`centraldb-mfa ARGS...`) against the app's database: (exit ok, stdout).
pub async fn cli(app: &TestApp, args: &[&str]) -> (bool, String) {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_centraldb-mfa"));
    c.args(args).env_clear().env("CENTRALDB_LOG_FORMAT", "json").env("RUST_LOG", "warn");
    for k in
        ["CENTRALDB_DATA_DIR", "CENTRALDB_DATABASE_URL", "CENTRALDB_ENCRYPTION_KEYS", "CENTRALDB_BOOTSTRAP_ADMIN_KEY"]
    {
        c.env(k, &app.vars[k]);
    }
    let out = c.output().await.unwrap();
    append_binary_log(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string())
}
