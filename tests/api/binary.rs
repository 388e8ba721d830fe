//! Tests against the real binary: start-up, restart persistence, key checks, logs, rotation.

use std::{
    path::Path,
    process::Stdio,
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_centraldb-mfa");

/// Environment for one deployment: a data folder and, on PostgreSQL, a fresh schema and key.
struct Deployment {
    dir: tempfile::TempDir,
    /// The data folder: not created beforehand, the service makes it.
    data: std::path::PathBuf,
    env: Vec<(String, String)>,
}

impl Deployment {
    /// On SQLite no key is configured (first run generates one); on PostgreSQL `k1` is.
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested").join("data");
        let mut env = vec![("CENTRALDB_DATA_DIR".to_string(), data.display().to_string())];
        if backend() == Backend::Postgres {
            env.push(("CENTRALDB_DATABASE_URL".into(), fresh_database_url(dir.path()).await));
            env.push(("CENTRALDB_ENCRYPTION_KEYS".into(), key_spec("k1")));
        }
        Self { dir, data, env }
    }

    fn with(&self, k: &str, v: &str) -> Vec<(String, String)> {
        let mut e: Vec<_> = self.env.iter().filter(|(n, _)| n != k).cloned().collect();
        e.push((k.into(), v.into()));
        e
    }

    fn without(&self, k: &str) -> Vec<(String, String)> {
        self.env.iter().filter(|(n, _)| n != k).cloned().collect()
    }

    fn admin_key(&self) -> String {
        std::fs::read_to_string(self.data.join("admin-api-key")).unwrap().trim().to_string()
    }

    fn key_spec_in_use(&self) -> String {
        match self.env.iter().find(|(k, _)| k == "CENTRALDB_ENCRYPTION_KEYS") {
            Some((_, v)) => v.clone(),
            None => std::fs::read_to_string(self.data.join("encryption.key")).unwrap().trim().to_string(),
        }
    }

    fn database_url(&self) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == "CENTRALDB_DATABASE_URL")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| format!("sqlite://{}", self.data.join("centraldb-mfa.db").display()))
    }

    /// Runs a raw SQL statement against the deployment's database (tampering).
    async fn exec(&self, sql: &str) {
        let url = self.database_url();
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        if url.starts_with("sqlite") {
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        } else {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }

    /// Row counts of every table, to prove a refused start-up changed nothing.
    async fn row_counts(&self) -> Vec<i64> {
        let url = self.database_url();
        let mut out = Vec::new();
        for t in ["api_keys", "token_bundles", "key_checks", "audit_events"] {
            let sql = sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {t}"));
            let n: i64 = if url.starts_with("sqlite") {
                let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
                let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
                pool.close().await;
                n
            } else {
                let pool = sqlx::PgPool::connect(&url).await.unwrap();
                let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
                pool.close().await;
                n
            };
            out.push(n);
        }
        out
    }
}

fn command(env: &[(String, String)], cwd: &Path, args: &[&str]) -> Command {
    test_logging();
    // A log-scanning run (`CENTRALDB_TEST_LOG_DIR`) runs every binary at trace; `env` may still override.
    let level = if log_dir().is_some() { "trace" } else { "info" };
    let mut c = Command::new(BIN);
    c.args(args)
        .env_clear()
        .current_dir(cwd)
        .env("CENTRALDB_LISTEN", "127.0.0.1:0")
        .env("CENTRALDB_LOG_FORMAT", "json")
        .env("RUST_LOG", level)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    async fn start(env: &[(String, String)], cwd: &Path) -> Self {
        let mut child = command(env, cwd, &["serve"]).spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1);
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && v["fields"]["message"] == "centraldb-mfa listening"
                    {
                        let _ = tx.try_send(v["fields"]["addr"].as_str().unwrap_or_default().to_string());
                    }
                    append_binary_log(&line);
                    log.lock().unwrap().push_str(&line);
                    log.lock().unwrap().push('\n');
                }
            });
        }
        let addr = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("server did not start; log:\n{}", log.lock().unwrap()))
            .unwrap();
        register_data_dir_secrets(env);
        Self { child, base: format!("http://{addr}"), log }
    }

    /// SIGTERM, then the exit status (graceful shutdown must exit 0).
    async fn stop(mut self) -> (bool, String) {
        let pid = self.child.id().unwrap().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let log = self.log.lock().unwrap().clone();
        (status.success(), log)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// Registers the keys a deployment generated into its data folder (log scan).
fn register_data_dir_secrets(env: &[(String, String)]) {
    let Some((_, data)) = env.iter().find(|(k, _)| k == "CENTRALDB_DATA_DIR") else { return };
    secret(std::fs::read_to_string(Path::new(data).join("admin-api-key")).unwrap_or_default().trim());
    let file_keys = std::fs::read_to_string(Path::new(data).join("encryption.key")).unwrap_or_default();
    let env_keys = env.iter().filter(|(k, _)| k == "CENTRALDB_ENCRYPTION_KEYS").map(|(_, v)| v.as_str());
    for part in env_keys.chain([file_keys.trim()]).flat_map(|v| v.split(',')) {
        secret_key(part.split_once(':').map_or(part, |(_, k)| k));
    }
    env.iter().filter(|(k, _)| k == "CENTRALDB_BOOTSTRAP_ADMIN_KEY").for_each(|(_, v)| _ = secret(v));
}

/// Runs a non-serving command to completion: (success, stdout, stderr). Its stderr (the log) is
/// appended to the scanned logs; stdout is the command's output (`api-key create` prints a key by
/// design), so keys printed there are registered as secrets instead.
async fn run(env: &[(String, String)], cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(60), command(env, cwd, args).output()).await.unwrap().unwrap();
    append_binary_log(&String::from_utf8_lossy(&out.stderr));
    for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if word.starts_with("cdbm_") || word.split_once(':').is_some_and(|(_, k)| k.len() == 44) {
            secret(word.split_once(':').map_or(word, |(_, k)| k));
        }
    }
    register_data_dir_secrets(env);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_stored_bundle_survives_a_restart() {
    let d = Deployment::new().await;
    let http = reqwest::Client::new();
    let s = Server::start(&d.env, d.dir.path()).await;
    if backend() == Backend::Sqlite {
        let mode = |f: &str| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(d.data.join(f)).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode("encryption.key"), 0o600, "generated key file is private");
        assert_eq!(mode("admin-api-key"), 0o600, "admin key file is private");
        assert_eq!(mode("centraldb-mfa.db"), 0o600, "database file is private");
        assert_eq!(mode("."), 0o700, "data folder is private");
        assert!(s.log.lock().unwrap().contains("generated one into the data folder"), "first run warns");
    }
    let key = d.admin_key();
    assert!(!s.log.lock().unwrap().contains(&key), "the admin key is never logged");
    // One body, built once: `garth_body` stamps expiry times from the clock.
    let stored = garth_body("p");
    let r = http.put(s.url(&tokens_path("persist"))).bearer_auth(&key).json(&stored).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let (clean, _) = s.stop().await;
    assert!(clean, "SIGTERM shuts down gracefully with exit 0");

    let s = Server::start(&d.env, d.dir.path()).await;
    let r = http.get(s.url(&tokens_path("persist"))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["oauth2_token"], stored["oauth2_token"]);
    assert_eq!(body["version"], 1);
    s.stop().await;
}

#[tokio::test]
async fn a_wrong_or_missing_key_refuses_to_start_and_changes_nothing() {
    let d = Deployment::new().await;
    let http = reqwest::Client::new();
    let s = Server::start(&d.env, d.dir.path()).await;
    http.put(s.url(&tokens_path("k"))).bearer_auth(d.admin_key()).json(&garth_body("k")).send().await.unwrap();
    s.stop().await;
    let before = d.row_counts().await;

    // Same key id, different key.
    let (ok, _, err) = run(&d.with("CENTRALDB_ENCRYPTION_KEYS", &key_spec("k1")), d.dir.path(), &["serve"]).await;
    assert!(!ok);
    assert!(err.contains("'k1'") && err.contains("cannot decrypt"), "{err}");
    // A keyring without the key the data is under.
    let (ok, _, err) = run(&d.with("CENTRALDB_ENCRYPTION_KEYS", &key_spec("k9")), d.dir.path(), &["serve"]).await;
    assert!(!ok);
    assert!(err.contains("'k1'"), "{err}");
    // A malformed key.
    let (ok, _, err) = run(&d.with("CENTRALDB_ENCRYPTION_KEYS", "k1:tooshort"), d.dir.path(), &["serve"]).await;
    assert!(!ok);
    assert!(err.contains("CENTRALDB_ENCRYPTION_KEYS") && err.contains("k1"), "{err}");
    // No key at all.
    let (ok, _, err) = match backend() {
        Backend::Postgres => run(&d.without("CENTRALDB_ENCRYPTION_KEYS"), d.dir.path(), &["serve"]).await,
        Backend::Sqlite => {
            let key_file = d.data.join("encryption.key");
            let saved = std::fs::read(&key_file).unwrap();
            std::fs::remove_file(&key_file).unwrap();
            let out = run(&d.env, d.dir.path(), &["serve"]).await;
            assert!(!key_file.exists(), "no new key is generated over existing data");
            std::fs::write(&key_file, saved).unwrap();
            out
        }
    };
    assert!(!ok);
    assert!(err.contains("CENTRALDB_ENCRYPTION_KEYS"), "{err}");
    assert_eq!(d.row_counts().await, before, "a refused start-up modifies nothing");
}

#[tokio::test]
async fn bad_configuration_names_the_variable() {
    let d = Deployment::new().await;
    let (ok, _, err) = run(&d.with("CENTRALDB_LISTEN", "not-an-address"), d.dir.path(), &["serve"]).await;
    assert!(!ok);
    assert!(err.contains("CENTRALDB_LISTEN"), "{err}");
    let (ok, _, err) = run(&d.with("CENTRALDB_BOOTSTRAP_ADMIN_KEY", "short"), d.dir.path(), &["serve"]).await;
    assert!(!ok);
    assert!(err.contains("CENTRALDB_BOOTSTRAP_ADMIN_KEY"), "{err}");
}

#[tokio::test]
async fn logs_at_trace_never_contain_secrets() {
    let d = Deployment::new().await;
    let bootstrap = "bootstrap-key-that-must-never-be-logged-0123456789";
    let mut env = d.with("CENTRALDB_BOOTSTRAP_ADMIN_KEY", bootstrap);
    env.retain(|(k, _)| k != "RUST_LOG");
    env.push(("RUST_LOG".into(), "trace".into()));
    let s = Server::start(&env, d.dir.path()).await;
    let http = reqwest::Client::new();
    let di = json!({"kind": "garminconnect", "di_token": jwt(future(3600), "LOGSECRET"),
                    "di_refresh_token": "di-refresh-LOGSECRET", "di_client_id": "di-client-LOGSECRET"});
    for (user, body) in [("log1", garth_body("log")), ("log2", di)] {
        let r = http.put(s.url(&tokens_path(user))).bearer_auth(bootstrap).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let r = http.get(s.url(&tokens_path(user))).bearer_auth(bootstrap).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.text().await;
    }
    let r = http
        .get(s.url(&format!("{}?representation=garth_dump", tokens_path("log1"))))
        .bearer_auth(bootstrap)
        .send()
        .await
        .unwrap();
    let dump: Value = r.json().await.unwrap();
    let dump = dump["garth_dump"].as_str().unwrap().to_string();
    let r = http.get(s.url(&tokens_path("log1"))).bearer_auth("cdbm_guessed-key-LOGSECRET").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let (_, log) = s.stop().await;
    assert!(log.contains("\"level\":\"TRACE\""), "trace logging really ran:\n{log}");
    assert!(log.contains("INSERT INTO token_bundles"), "statements on the token table are logged (without values)");
    let key_b64 = d.key_spec_in_use().split_once(':').unwrap().1.to_string();
    let mut secrets = garth_secrets("log");
    secrets.extend(["LOGSECRET".to_string(), bootstrap.to_string(), key_b64, dump]);
    secrets.iter().for_each(|s| _ = secret(s));
    for s in &secrets {
        assert!(!log.contains(s.as_str()), "secret {s:.12}… found in the logs");
    }
}

#[tokio::test]
async fn rewrap_moves_everything_to_the_new_key_and_the_old_key_can_go() {
    let d = Deployment::new().await;
    let k1 = key_spec("k1");
    let env1 = d.with("CENTRALDB_ENCRYPTION_KEYS", &k1);
    let http = reqwest::Client::new();
    let s = Server::start(&env1, d.dir.path()).await;
    let key = d.admin_key();
    for u in ["r1", "r2", "r3"] {
        let r = http.put(s.url(&tokens_path(u))).bearer_auth(&key).json(&garth_body(u)).send().await.unwrap();
        assert_eq!(r.status(), 201);
    }
    // An MFA login in progress: its resume state is encrypted too.
    secret("pickled-ROTATE");
    let ch: Value = http
        .post(s.url("/api/v1/mfa/challenges"))
        .bearer_auth(&key)
        .json(&json!({"user_id": "r1", "method": "email", "verifier": "external", "resume_state": "pickled-ROTATE"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ch_id = ch["id"].as_str().unwrap().to_string();
    s.stop().await;

    let k2 = key_spec("k2");
    // Without k1 the data cannot be read yet: start-up refuses.
    let (ok, _, err) = run(&d.with("CENTRALDB_ENCRYPTION_KEYS", &k2), d.dir.path(), &["serve"]).await;
    assert!(!ok && err.contains("'k1'"), "{err}");
    // Rotate: new key first, old key still present; rewrap reports its counts.
    let both = d.with("CENTRALDB_ENCRYPTION_KEYS", &format!("{k2},{k1}"));
    let (ok, out, err) = run(&both, d.dir.path(), &["rewrap"]).await;
    assert!(ok, "{out}{err}");
    // Three bundles and one resume state.
    assert!(out.contains("rewrapped 4 ciphertext(s) under key 'k2'"), "{out}");
    // Three token writes and one challenge creation.
    assert!(out.contains("; re-sealed 4 audit event(s)"), "the audit chain moves to k2 too: {out}");
    let (ok, out, _) = run(&both, d.dir.path(), &["rewrap"]).await;
    assert!(ok && out.contains("rewrapped 0"), "a second pass has nothing to do: {out}");
    assert!(out.contains("re-sealed 0 audit event(s)"), "{out}");
    // The old key removed: everything still decrypts.
    let s = Server::start(&d.with("CENTRALDB_ENCRYPTION_KEYS", &k2), d.dir.path()).await;
    for u in ["r1", "r2", "r3"] {
        let r = http.get(s.url(&tokens_path(u))).bearer_auth(&key).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["oauth2_token"]["access_token"], format!("acc-{u}-SECRET"));
        assert_eq!(body["version"], 1, "rewrap does not change the version");
    }
    let a: Value = http
        .post(s.url(&format!("/api/v1/mfa/challenges/{ch_id}/attempts")))
        .bearer_auth(&key)
        .json(&json!({"code": "123456"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(a["resume_state"], "pickled-ROTATE", "the resume state decrypts under the new key alone");
    s.stop().await;
    // The audit chain, re-sealed under k2, still verifies without k1.
    let (ok, out, err) = run(&d.with("CENTRALDB_ENCRYPTION_KEYS", &k2), d.dir.path(), &["audit", "verify"]).await;
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), "audit chain ok: 10 events", "3 writes, 1 challenge + 1 attempt, 2 rewraps, 3 reads");
}

#[tokio::test]
async fn audit_verify_finds_a_tampered_row() {
    let d = Deployment::new().await;
    let http = reqwest::Client::new();
    let s = Server::start(&d.env, d.dir.path()).await;
    let key = d.admin_key();
    for u in ["a1", "a2", "a3"] {
        let r = http.put(s.url(&tokens_path(u))).bearer_auth(&key).json(&garth_body(u)).send().await.unwrap();
        assert_eq!(r.status(), 201);
    }
    let r = http.get(s.url("/api/v1/audit/verify")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"ok": true, "events_checked": 3}));
    s.stop().await;
    let (ok, out, err) = run(&d.env, d.dir.path(), &["audit", "verify"]).await;
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), "audit chain ok: 3 events");

    d.exec("UPDATE audit_events SET user_id = 'someone-else' WHERE seq = 2").await;
    let (ok, out, err) = run(&d.env, d.dir.path(), &["audit", "verify"]).await;
    assert!(!ok, "a broken chain exits 1: {out}{err}");
    assert!(out.starts_with("audit chain BROKEN at seq 2: "), "{out}");
    d.exec("DELETE FROM audit_events WHERE seq = 2").await;
    let (ok, out, _) = run(&d.env, d.dir.path(), &["audit", "verify"]).await;
    assert!(!ok && out.starts_with("audit chain BROKEN at seq 2: event seq 2 is missing"), "{out}");
    // Rewrap will not re-seal (and so launder) a broken chain.
    let k2 = key_spec("k2");
    let both = d.with("CENTRALDB_ENCRYPTION_KEYS", &format!("{k2},{}", d.key_spec_in_use()));
    let (ok, out, _) = run(&both, d.dir.path(), &["rewrap"]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("rewrapped 3 ciphertext(s) under key 'k2'"), "{out}");
    assert!(out.contains("audit chain NOT re-sealed: BROKEN at seq 2"), "{out}");
}

#[tokio::test]
async fn api_key_commands_create_list_revoke() {
    let d = Deployment::new().await;
    let (ok, key, err) =
        run(&d.env, d.dir.path(), &["api-key", "create", "--name", "worker", "--scope", "tokens:read", "tokens:write"])
            .await;
    assert!(ok, "{err}");
    let key = key.trim().to_string();
    assert!(key.starts_with("cdbm_"));
    let (ok, list, _) = run(&d.env, d.dir.path(), &["api-key", "list"]).await;
    assert!(ok);
    assert!(list.contains("worker") && list.contains("tokens:read tokens:write"), "{list}");
    assert!(!list.contains(&key), "list never shows keys");
    let id = list.lines().find(|l| l.contains("worker")).unwrap().split_whitespace().next().unwrap().to_string();
    let (ok, _, _) = run(&d.env, d.dir.path(), &["api-key", "revoke", &id]).await;
    assert!(ok);
    let (_, list, _) = run(&d.env, d.dir.path(), &["api-key", "list"]).await;
    assert!(list.lines().any(|l| l.contains("worker") && l.contains("revoked")), "{list}");
    let (ok, _, err) = run(&d.env, d.dir.path(), &["api-key", "create", "--name", "x", "--scope", "root"]).await;
    assert!(!ok && err.contains("unknown scope 'root'"), "{err}");
    let (ok, out, _) = run(&d.env, d.dir.path(), &["keygen", "--id", "k7"]).await;
    assert!(ok && out.trim().starts_with("k7:") && out.trim().len() == 3 + 44, "{out}");
}

/// Two service processes on one database: concurrent verifications split between them still
/// allow exactly one success and at most `max_attempts` checks; consumption happens once.
#[tokio::test]
async fn two_processes_on_one_database_agree_on_attempts() {
    let d = Deployment::new().await;
    let a = Server::start(&d.env, d.dir.path()).await;
    let b = Server::start(&d.env, d.dir.path()).await;
    let key = d.admin_key();
    let http = reqwest::Client::new();
    let create = |code: &str, max: i64| {
        let body =
            json!({"user_id": "multi", "method": "email", "verifier": "service", "code": code, "max_attempts": max});
        http.post(a.url("/api/v1/mfa/challenges")).bearer_auth(&key).json(&body).send()
    };
    let fire = |id: String, codes: Vec<String>, path: &'static str| {
        let mut set = tokio::task::JoinSet::new();
        for (i, code) in codes.into_iter().enumerate() {
            let url = if i % 2 == 0 { a.url("") } else { b.url("") };
            let (http, key, id) = (http.clone(), key.clone(), id.clone());
            set.spawn(async move {
                let r = http
                    .post(format!("{url}/api/v1/mfa/challenges/{id}/{path}"))
                    .bearer_auth(key)
                    .json(&json!({"code": code}))
                    .send()
                    .await
                    .unwrap();
                r.status().as_u16()
            });
        }
        set.join_all()
    };

    // 40 right codes, across both processes.
    secret("123456");
    let r: Value = create("123456", 5).await.unwrap().json().await.unwrap();
    let id = r["id"].as_str().unwrap().to_string();
    let statuses = fire(id.clone(), vec!["123456".to_string(); 40], "verify").await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert!(statuses.iter().all(|s| [200, 409, 423].contains(s)), "{statuses:?}");
    let g: Value = http
        .get(b.url(&format!("/api/v1/mfa/challenges/{id}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(g["attempts"].as_i64().unwrap() <= 5, "{g}");
    // 20 consumes across both: exactly one.
    let statuses = fire(id.clone(), vec!["x".to_string(); 20], "consume").await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");

    // 30 wrong codes, across both: exactly max_attempts are checked.
    let r: Value = create("123456", 4).await.unwrap().json().await.unwrap();
    let id = r["id"].as_str().unwrap().to_string();
    let codes = (0..30).map(|i| format!("{:06}", 300_000 + i)).collect();
    (0..30).for_each(|i| _ = secret(&format!("{:06}", 300_000 + i)));
    let statuses = fire(id.clone(), codes, "verify").await;
    assert_eq!(statuses.iter().filter(|s| **s == 400).count(), 4, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 423).count(), 26, "{statuses:?}");
    let g: Value = http
        .get(a.url(&format!("/api/v1/mfa/challenges/{id}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((g["status"].as_str(), g["attempts"].as_i64()), (Some("failed"), Some(4)));
    a.stop().await;
    b.stop().await;
}

/// Two processes on one database agree on the refresh lease, and a reader waiting on one
/// process receives the version written through the other (LISTEN/NOTIFY on PostgreSQL, a
/// short poll on SQLite).
#[tokio::test]
async fn two_processes_agree_on_the_lease_and_wake_each_others_waiters() {
    let d = Deployment::new().await;
    let a = Server::start(&d.env, d.dir.path()).await;
    let b = Server::start(&d.env, d.dir.path()).await;
    let key = d.admin_key();
    let http = reqwest::Client::new();
    let path = tokens_path("shared");
    let r = http.put(a.url(&path)).bearer_auth(&key).json(&garth_body("v1")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let lease = |srv: &Server, holder: &str| {
        http.post(srv.url(&format!("{path}/lease"))).bearer_auth(&key).json(&json!({"holder": holder})).send()
    };
    // Concurrent acquisition through both processes: one winner.
    let (ra, rb) = tokio::join!(lease(&a, "worker-a"), lease(&b, "worker-b"));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let mut statuses = [ra.status().as_u16(), rb.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [201, 409]);
    let (winner, loser) = if ra.status() == 201 { (&a, &b) } else { (&b, &a) };
    let granted: Value = if ra.status() == 201 { ra.json().await.unwrap() } else { rb.json().await.unwrap() };
    let fence = granted["fence"].as_i64().unwrap();
    // The loser's process waits for the new version; the winner writes it.
    let waiter = {
        let (http, key, url) = (http.clone(), key.clone(), loser.url(&format!("{path}?newer_than=1&wait_seconds=15")));
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            let r = http.get(url).bearer_auth(key).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap(), t.elapsed())
        })
    };
    // The loser's process says (in /metrics) that the reader waits, before the winner writes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = http.get(loser.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if m.lines().any(|l| l == "centraldb_longpoll_waiters 1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the reader never started waiting: {m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let w = http
        .put(winner.url(&path))
        .bearer_auth(&key)
        .header("x-lease-fence", fence.to_string())
        .json(&garth_body("refreshed"))
        .send()
        .await
        .unwrap();
    assert_eq!(w.status(), 200);
    let (status, body, waited) = waiter.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["version"], 2);
    assert_eq!(body["oauth2_token"]["access_token"], "acc-refreshed-SECRET");
    assert!(waited < Duration::from_secs(5), "woken across processes in {waited:?}");
    a.stop().await;
    b.stop().await;
}

/// At `CENTRALDB_MAX_CONNECTIONS` open connections the server stops accepting; a waiting client
/// is served as soon as one closes.
#[tokio::test]
async fn the_connection_limit_holds_extra_clients_until_one_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Deployment::new().await;
    let s = Server::start(&d.with("CENTRALDB_MAX_CONNECTIONS", "2"), d.dir.path()).await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let get = |mut c: tokio::net::TcpStream| async move {
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        c
    };
    // Two keep-alive connections, each served once and then held open.
    let c1 = get(tokio::net::TcpStream::connect(&addr).await.unwrap()).await;
    let c2 = get(tokio::net::TcpStream::connect(&addr).await.unwrap()).await;
    // A third connects (the kernel accepts it into the backlog) but is not served...
    let third = tokio::spawn({
        let addr = addr.clone();
        async move { get(tokio::net::TcpStream::connect(&addr).await.unwrap()).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third connection must wait while two are open");
    // ...until one of the two closes.
    drop(c1);
    let served = tokio::time::timeout(Duration::from_secs(5), third).await;
    assert!(served.is_ok(), "the waiting client is served once a connection closes");
    drop(c2);
    s.stop().await;
}

/// Three processes on one database: 100 concurrent right-code verifications of one challenge give
/// exactly one success; 100 concurrent If-Match PUTs of the same version give exactly one write;
/// and three instances sweeping at once record each expiry once.
#[tokio::test]
async fn three_processes_one_success_one_write_one_expiry_record() {
    let d = Deployment::new().await;
    let env = d.with("CENTRALDB_SWEEP_INTERVAL_SECS", "1");
    let servers = [
        Server::start(&env, d.dir.path()).await,
        Server::start(&env, d.dir.path()).await,
        Server::start(&env, d.dir.path()).await,
    ];
    let key = d.admin_key();
    let http = reqwest::Client::new();
    let base = |i: usize| servers[i % 3].url("");

    let ch: Value = http
        .post(format!("{}/api/v1/mfa/challenges", base(0)))
        .bearer_auth(&key)
        .json(
            &json!({"user_id": "tri", "method": "email", "verifier": "service", "code": "123456", "max_attempts": 10}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = ch["id"].as_str().unwrap().to_string();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..100 {
        let (http, key, url) = (http.clone(), key.clone(), format!("{}/api/v1/mfa/challenges/{id}/verify", base(i)));
        set.spawn(async move {
            http.post(url).bearer_auth(key).json(&json!({"code": "123456"})).send().await.unwrap().status().as_u16()
        });
    }
    let statuses = set.join_all().await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");

    let put = http.put(format!("{}{}", base(0), tokens_path("tri"))).bearer_auth(&key).json(&garth_body("v1")).send();
    assert_eq!(put.await.unwrap().status(), 201);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..100 {
        let (http, key, url) = (http.clone(), key.clone(), format!("{}{}", base(i), tokens_path("tri")));
        set.spawn(async move {
            let r =
                http.put(url).bearer_auth(key).header("if-match", "\"1\"").json(&garth_body(&format!("w{i}"))).send();
            r.await.unwrap().status().as_u16()
        });
    }
    let statuses = set.join_all().await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 412).count(), 99, "{statuses:?}");

    // Challenges expire while all three instances sweep every second. One user asks for ten
    // (three are accepted, the rest get 429), nine users for one each: twelve expire.
    // The lifetime (5 s) must outlast the ten creations (each hashes a code with argon2, slow on
    // a loaded machine), else an early one expires and a fourth is accepted.
    let mut accepted = 0;
    for _ in 0..10 {
        let body = json!({"user_id": "tri2", "method": "email", "verifier": "service", "ttl_seconds": 5});
        let r = http.post(format!("{}/api/v1/mfa/challenges", base(1))).bearer_auth(&key).json(&body).send().await;
        accepted += usize::from(r.unwrap().status() == 201);
    }
    assert_eq!(accepted, 3);
    for u in 0..9 {
        let body = json!({"user_id": format!("tri-{u}"), "method": "email", "verifier": "service", "ttl_seconds": 5});
        http.post(format!("{}/api/v1/mfa/challenges", base(u))).bearer_auth(&key).json(&body).send().await.unwrap();
    }
    // Wait until twelve expiries are recorded (or 30 s), then a little longer so that a
    // duplicate record by another instance would show too.
    let expired = async || -> Value {
        let url = format!("{}/api/v1/audit/events?type=challenge.expired&limit=1000", base(2));
        http.get(url).bearer_auth(&key).send().await.unwrap().json().await.unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while expired().await["events"].as_array().unwrap().len() < 12 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = expired().await;
    let ids: Vec<&str> =
        events["events"].as_array().unwrap().iter().map(|e| e["details"]["challenge_id"].as_str().unwrap()).collect();
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(ids.len(), unique.len(), "each expiry is recorded once: {ids:?}");
    assert_eq!(ids.len(), 12, "3 + 9 challenges expired, each recorded once");
    for s in servers {
        s.stop().await;
    }
}

/// A failed SQLite write alone (its savepoint rolled back, nothing else to commit) must not keep
/// the shared write transaction open: another process can write at once, and SIGTERM stops the
/// service without waiting for the connection. (Found by schemathesis.)
#[tokio::test]
async fn a_failed_write_alone_releases_the_sqlite_write_lock() {
    if backend() != Backend::Sqlite {
        return;
    }
    let d = Deployment::new().await;
    let http = reqwest::Client::new();
    let s = Server::start(&d.env, d.dir.path()).await;
    let key = d.admin_key();
    for _ in 0..2 {
        let r = http.delete(s.url("/api/v1/sessions/01890a5d-ac96-774b-bcce-b302099a8057")).bearer_auth(&key);
        assert_eq!(r.send().await.unwrap().status(), 404);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(&d.database_url()).unwrap().busy_timeout(Duration::ZERO);
    let mut other = sqlx::ConnectOptions::connect(&opts).await.unwrap();
    let begun = sqlx::query("BEGIN IMMEDIATE").execute(&mut other).await;
    assert!(begun.is_ok(), "another process cannot write: {begun:?}");
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    let started = std::time::Instant::now();
    let (clean, log) = s.stop().await;
    assert!(clean);
    assert!(started.elapsed() < Duration::from_secs(3), "shutdown took {:?}", started.elapsed());
    assert!(!log.contains("did not close"), "{log}");
}

/// The real server records the TCP peer of each request as the event's `source_ip`: a write,
/// a read and a refusal over loopback all say `127.0.0.1`, and so does the events API.
#[tokio::test]
async fn the_binary_records_the_peer_address_in_audit_events() {
    let d = Deployment::new().await;
    let http = reqwest::Client::new();
    let s = Server::start(&d.env, d.dir.path()).await;
    let key = d.admin_key();
    let p = tokens_path("peer");
    let r = http.put(s.url(&p)).bearer_auth(&key).json(&garth_body("peer")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(http.get(s.url(&p)).bearer_auth(&key).send().await.unwrap().status(), 200);
    assert_eq!(http.get(s.url(&p)).send().await.unwrap().status(), 401);
    let r = http.get(s.url("/api/v1/audit/events")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let got: Vec<(&str, &str)> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["source_ip"].as_str().unwrap_or("<null>")))
        .collect();
    assert_eq!(got, [("token.write", "127.0.0.1"), ("token.read", "127.0.0.1"), ("auth.denied", "127.0.0.1")]);
    s.stop().await;
}

/// Sends `POST path` with a JSON body on a raw connection, then resets it (RST, SO_LINGER 0)
/// once `reserved` says the attempt is taken: the client went away while its code was checked.
async fn send_then_reset(addr: &str, key: &str, path: &str, body: &Value, reserved: impl AsyncFn() -> bool) {
    use std::os::fd::AsRawFd;
    use tokio::io::AsyncWriteExt;
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !reserved().await {
        assert!(std::time::Instant::now() < deadline, "the attempt was never reserved");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut probe = [0u8; 1];
    assert!(
        matches!(c.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the server answered before the client went away: make argon2 slower"
    );
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid open socket and a correctly sized `linger` value.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(c);
}

/// A client that resets its connection while its code is checked (issue 15, finding 6), against
/// the real binary: the wrong code is still counted and audited, the right one still verifies
/// the challenge and moves the session.
#[tokio::test]
async fn a_verification_whose_client_resets_the_connection_is_still_recorded() {
    let d = Deployment::new().await;
    // A slow check (~0.2 s), so the reset surely comes while it runs.
    let mut env = d.with("CENTRALDB_ARGON2_MEMORY_KIB", "8192");
    env.push(("CENTRALDB_ARGON2_ITERATIONS".into(), "30".into()));
    let s = Server::start(&env, d.dir.path()).await;
    let key = d.admin_key();
    let http = reqwest::Client::new();
    let session: Value = http
        .post(s.url("/api/v1/sessions"))
        .bearer_auth(&key)
        .json(&json!({"user_id": "rst"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ch: Value = http
        .post(s.url("/api/v1/mfa/challenges"))
        .bearer_auth(&key)
        .json(&json!({"user_id": "rst", "session_id": session["id"], "method": "email", "verifier": "service",
                      "code": "123456"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = ch["id"].as_str().unwrap().to_string();
    let addr = s.base.trim_start_matches("http://").to_string();
    let get = |path: String| {
        let (http, key) = (http.clone(), key.clone());
        async move { http.get(path).bearer_auth(key).send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let challenge = || get(s.url(&format!("/api/v1/mfa/challenges/{id}")));
    let events = |t: &str| get(s.url(&format!("/api/v1/audit/events?type={t}&limit=100")));

    let path = format!("/api/v1/mfa/challenges/{id}/verify");
    send_then_reset(&addr, &key, &path, &json!({"code": "000000"}), async || challenge().await["attempts"] == 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while events("challenge.verify_failed").await["events"].as_array().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the abandoned wrong code was never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed = events("challenge.verify_failed").await;
    assert_eq!(failed["events"][0]["details"]["challenge_id"], id.as_str());
    assert_eq!(failed["events"][0]["details"]["attempts_remaining"], 4);
    assert_eq!(challenge().await["status"], "pending");

    send_then_reset(&addr, &key, &path, &json!({"code": "123456"}), async || challenge().await["attempts"] == 2).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while challenge().await["status"] != "verified" {
        assert!(std::time::Instant::now() < deadline, "the abandoned right code never verified the challenge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sid = session["id"].as_str().unwrap();
    let state = get(s.url(&format!("/api/v1/sessions/{sid}"))).await;
    assert_eq!(state["state"], "mfa_verified", "{state}");
    assert_eq!(events("challenge.verified").await["events"].as_array().unwrap().len(), 1);
    let (clean, log) = s.stop().await;
    assert!(clean, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// Issue 15 finding 1, on the real server: 300 requests with invented (and long) method names
/// add one series (`method="other"`, `path="unmatched"`), not 300.
#[tokio::test]
async fn metrics_stay_bounded_under_invented_methods() {
    let d = Deployment::new().await;
    let s = Server::start(&d.env, d.dir.path()).await;
    let http = reqwest::Client::new();
    let metrics = || async { http.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap() };
    let before = metrics().await;
    for i in 0..300 {
        let method = reqwest::Method::from_bytes(format!("Y{i:07}{}", "A".repeat(1000)).as_bytes()).unwrap();
        let r = http.request(method, s.url("/nope")).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
    let after = metrics().await;
    assert!(!after.contains("Y0000"), "an invented method became a label");
    assert!(after.contains(r#"method="other""#) && after.contains(r#"path="unmatched""#), "{after}");
    // At most the new series of `other`/`unmatched` and of the /metrics GET (a counter line and
    // 17 histogram lines each, plus their HELP/TYPE lines); 300 methods made ~5,400 lines.
    let grown = after.lines().count() as i64 - before.lines().count() as i64;
    assert!(grown <= 60, "/metrics grew by {grown} lines");
    s.stop().await;
}

/// Issue 15 finding 8: a database URL's credentials (userinfo password, `password`,
/// `sslpassword`, ...) never reach the output of `migrate` or `serve`, at any log level, whether
/// the URL fails to parse, the database is unreachable or migrating succeeds.
#[tokio::test]
async fn database_url_secrets_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let mut urls = vec![
        "postgres://user:SECRETX1@127.0.0.1:1/db?password=SECRETX2&sslpassword=SECRETX3&application_name=app"
            .to_string(),
        "postgres://user@127.0.0.1:1/db?sslmode=disable&pass%77ord=SECRETX4&SSLPASSWORD=SECRETX5&SECRETX6".to_string(),
        "postgres://user:pa/SECRETX7@127.0.0.1:1/db".to_string(),
        "postgres://user:pa?SECRETX8@127.0.0.1:1/db".to_string(),
        "postgres://user:SECRETX9@127.0.0.1:notaport/db?password=SECRETX10".to_string(),
        format!("sqlite://{data}/x.db?password=SECRETX11"),
    ];
    let key = key_spec("k1");
    let mut ok_url = None;
    if backend() == Backend::Postgres {
        // Trust authentication ignores the password: `migrate` succeeds and reports the URL.
        let url = fresh_database_url(dir.path()).await;
        ok_url = Some(format!("{url}&password=SECRETX12&sslpassword=SECRETX13"));
        urls.push(ok_url.clone().unwrap());
    }
    for url in &urls {
        for args in [&["migrate"][..], &["serve"][..]] {
            let env: Vec<(String, String)> = [
                ("CENTRALDB_DATA_DIR", data.as_str()),
                ("CENTRALDB_DATABASE_URL", url.as_str()),
                ("CENTRALDB_DB_ACQUIRE_TIMEOUT_MS", "500"),
                ("RUST_LOG", "trace"),
                ("CENTRALDB_ENCRYPTION_KEYS", key.as_str()),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            if Some(url) == ok_url.as_ref() && args[0] == "serve" {
                let s = Server::start(&env, dir.path()).await;
                let (_, log) = s.stop().await;
                assert!(!log.contains("SECRETX"), "{url} serve: {log}");
                continue;
            }
            let (ok, out, err) = run(&env, dir.path(), args).await;
            assert_eq!(ok, Some(url) == ok_url.as_ref(), "{url} {args:?}: {err}");
            assert!(!out.contains("SECRETX") && !err.contains("SECRETX"), "{url} {args:?}:\n{out}\n{err}");
        }
    }
}

/// Issue 15 finding 14: key material that is obviously not random is refused at start-up,
/// naming the variable and why, with a non-zero exit and nothing changed in the database;
/// `keygen` output is accepted both as an encryption key and as the bootstrap admin key.
#[tokio::test]
async fn weak_keys_are_refused_at_start_up() {
    use base64::Engine;
    let b64 = |raw: &[u8]| base64::engine::general_purpose::STANDARD.encode(raw);
    let d = Deployment::new().await;
    let s = Server::start(&d.env, d.dir.path()).await;
    s.stop().await;
    let before = d.row_counts().await;
    let half: [u8; 16] = rand::random();
    let cases = [
        ("CENTRALDB_ENCRYPTION_KEYS", format!("k1:{}", b64(&[0u8; 32])), "all its bytes are the same"),
        ("CENTRALDB_ENCRYPTION_KEYS", format!("k1:{}", b64(&[half, half].concat())), "pattern of 16 bytes"),
        ("CENTRALDB_ENCRYPTION_KEYS", format!("k1:{}", b64(&(0u8..32).collect::<Vec<_>>())), "sequence"),
        ("CENTRALDB_BOOTSTRAP_ADMIN_KEY", "a".repeat(32), "all its bytes are the same"),
        ("CENTRALDB_BOOTSTRAP_ADMIN_KEY", "0123456789".repeat(4), "pattern of 10 bytes"),
        ("CENTRALDB_BOOTSTRAP_ADMIN_KEY", "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ".to_string(), "sequence"),
    ];
    for (var, value, why) in cases {
        // Not `run`: it registers the configured keys as secrets for the log scan, and these
        // weak ones (`aaaa...`, `0123...`) would be "found" in unrelated log lines.
        let out = command(&d.with(var, &value), d.dir.path(), &["serve"]).output().await.unwrap();
        let (ok, err) = (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned());
        append_binary_log(&err);
        assert!(!ok, "{var}={value} was accepted");
        assert!(err.contains(var) && err.contains("not random") && err.contains(why), "{var}={value}: {err}");
        assert!(!err.contains(&value), "the key itself is not printed: {err}");
        assert_eq!(d.row_counts().await, before, "a refused start-up modifies nothing");
    }
    // keygen output passes both checks.
    let (ok, key, _) = run(&d.env, d.dir.path(), &["keygen", "--id", "k2"]).await;
    assert!(ok);
    let (ok, admin, _) = run(&d.env, d.dir.path(), &["keygen"]).await;
    assert!(ok);
    let keys = format!("{},{}", d.key_spec_in_use(), key.trim());
    let env = [
        d.with("CENTRALDB_ENCRYPTION_KEYS", &keys),
        vec![("CENTRALDB_BOOTSTRAP_ADMIN_KEY".to_string(), admin.trim().to_string())],
    ]
    .concat();
    let s = Server::start(&env, d.dir.path()).await;
    let r = reqwest::Client::new().get(s.url(&tokens_path("nobody"))).bearer_auth(admin.trim()).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(s.stop().await.0);
}

/// A verification whose client went away is still finished when SIGTERM comes right after: the
/// graceful shutdown waits for the detached MFA write before it closes the pool, so the wrong
/// code is counted and audited (read back by a second process on the same data).
#[tokio::test]
async fn shutdown_waits_for_an_abandoned_verification() {
    let d = Deployment::new().await;
    // A slow check (~0.2 s, more under load), so SIGTERM surely comes while it runs.
    let mut env = d.with("CENTRALDB_ARGON2_MEMORY_KIB", "8192");
    env.push(("CENTRALDB_ARGON2_ITERATIONS".into(), "60".into()));
    let s = Server::start(&env, d.dir.path()).await;
    let key = d.admin_key();
    let http = reqwest::Client::new();
    let ch: Value = http
        .post(s.url("/api/v1/mfa/challenges"))
        .bearer_auth(&key)
        .json(&json!({"user_id": "term", "method": "email", "verifier": "service", "code": "123456"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = ch["id"].as_str().unwrap().to_string();
    let addr = s.base.trim_start_matches("http://").to_string();
    let url = s.url(&format!("/api/v1/mfa/challenges/{id}"));
    let attempts = async || {
        let r = http.get(url.clone()).bearer_auth(&key).send().await.unwrap();
        r.json::<Value>().await.unwrap()["attempts"].clone()
    };
    let path = format!("/api/v1/mfa/challenges/{id}/verify");
    send_then_reset(&addr, &key, &path, &json!({"code": "000000"}), async || attempts().await == 1).await;
    let (clean, log) = s.stop().await;
    assert!(clean, "{log}");
    assert!(!log.contains("MFA writes still running"), "{log}");

    let s = Server::start(&env, d.dir.path()).await;
    let r = http
        .get(s.url("/api/v1/audit/events?type=challenge.verify_failed&limit=10"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let failed: Value = r.json().await.unwrap();
    let failed = failed["events"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "the abandoned check was recorded before the process exited: {failed:?}");
    assert_eq!(failed[0]["details"]["challenge_id"], id.as_str());
    let r = http.get(s.url(&format!("/api/v1/mfa/challenges/{id}"))).bearer_auth(&key).send().await.unwrap();
    let c: Value = r.json().await.unwrap();
    assert_eq!((c["status"].as_str(), c["attempts"].as_i64()), (Some("pending"), Some(1)), "{c}");
    assert!(s.stop().await.0);
}

/// The JSON log lines of a server's output whose message is `request finished`.
fn request_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request finished")
        .collect()
}

/// Issue 13 item 6: a 4xx line names the problem code, the API key and the client address;
/// probes and scrapes log at DEBUG, other requests at INFO.
#[tokio::test]
async fn request_lines_carry_code_key_and_client_and_probes_are_debug() {
    let d = Deployment::new().await;
    let s = Server::start(&d.with("RUST_LOG", "debug"), d.dir.path()).await;
    let http = reqwest::Client::new();
    let key = d.admin_key();
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(http.get(s.url(path)).send().await.unwrap().status(), 200);
    }
    let r = http.get(s.url(&tokens_path("nobody"))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = http.get(s.url(&tokens_path("nobody"))).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let (_, list, _) = run(&d.env, d.dir.path(), &["api-key", "list"]).await;
    let key_id = list
        .lines()
        .find(|l| l.contains("first-run admin") || l.contains("bootstrap"))
        .map(|l| l.split_whitespace().next().unwrap().to_string());
    let log = s.stop().await.1;
    let lines = request_lines(&log);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let l = lines.iter().find(|l| l["span"]["path"] == path).unwrap_or_else(|| panic!("{path}: {log}"));
        assert_eq!(l["level"], "DEBUG", "{l}");
    }
    let not_found = lines.iter().find(|l| l["fields"]["status"] == 404).unwrap_or_else(|| panic!("{log}"));
    assert_eq!(not_found["level"], "INFO", "{not_found}");
    assert_eq!(not_found["fields"]["code"], "tokens_not_found", "{not_found}");
    assert_eq!(not_found["span"]["client"], "127.0.0.1", "{not_found}");
    let logged_key = not_found["span"]["key_id"].as_str().unwrap_or_else(|| panic!("no key_id: {not_found}"));
    assert!(uuid::Uuid::from_str(logged_key).is_ok(), "{not_found}");
    if let Some(id) = key_id {
        assert_eq!(logged_key, id);
    }
    let refused = lines.iter().find(|l| l["fields"]["status"] == 401).unwrap_or_else(|| panic!("{log}"));
    assert_eq!(refused["fields"]["code"], "unauthenticated", "{refused}");
    assert_eq!(refused["span"]["client"], "127.0.0.1", "{refused}");
    assert!(refused["span"]["key_id"].is_null(), "no key was verified: {refused}");
    assert!(!log.contains(&key), "the key itself is never logged");
}

/// Issue 13 item 6: the pretty format writes no ANSI escape codes when stderr is not a terminal
/// (a file, a pipe, `docker logs`).
#[tokio::test]
async fn pretty_logs_have_no_colour_codes_outside_a_terminal() {
    let d = Deployment::new().await;
    let env = [d.with("CENTRALDB_LOG_FORMAT", "pretty"), vec![("RUST_LOG".into(), "debug".into())]].concat();
    let (ok, _, err) = run(&env, d.dir.path(), &["migrate"]).await;
    assert!(ok, "{err}");
    assert!(err.contains("INFO") || err.contains("WARN"), "the run logged something: {err}");
    assert!(!err.contains('\u{1b}'), "ANSI escape in piped logs: {err:?}");
}

/// Issue 13 item 6: an invalid `RUST_LOG` stops start-up with a message naming the variable
/// (a typo used to silence all logging).
#[tokio::test]
async fn an_invalid_rust_log_is_a_start_up_error() {
    let d = Deployment::new().await;
    for bad in ["inof", "sqlx=loud", "info,[{"] {
        let (ok, _, err) = run(&d.with("RUST_LOG", bad), d.dir.path(), &["serve"]).await;
        assert!(!ok, "RUST_LOG={bad} was accepted");
        assert!(err.contains("configuration: RUST_LOG:"), "RUST_LOG={bad}: {err}");
        let (ok, _, err) = run(&d.with("RUST_LOG", bad), d.dir.path(), &["migrate"]).await;
        assert!(!ok && err.contains("RUST_LOG"), "migrate, RUST_LOG={bad}: {err}");
    }
    assert!(!d.data.join("centraldb-mfa.db").exists(), "a refused start-up created no database");
    let (ok, _, err) = run(&d.with("RUST_LOG", "warn,centraldb_mfa=debug"), d.dir.path(), &["migrate"]).await;
    assert!(ok, "{err}");
}

/// Issue 13 item 7: `api-key revoke` takes the prefix `api-key list` shows (or the id); names
/// are unique among active keys; unknown and already revoked keys get clear errors.
#[tokio::test]
async fn api_keys_are_revoked_by_prefix_and_names_are_unique() {
    let d = Deployment::new().await;
    let create = |name: &'static str| {
        let env = d.env.clone();
        let dir = d.dir.path().to_path_buf();
        async move { run(&env, &dir, &["api-key", "create", "--name", name, "--scope", "tokens:read"]).await }
    };
    let (ok, first_key, err) = create("worker").await;
    assert!(ok, "{err}");
    let first_key = first_key.trim().to_string();
    let (ok, _, err) = create("worker").await;
    assert!(!ok && err.contains("an active API key named 'worker' exists"), "{err}");
    let (_, list, _) = run(&d.env, d.dir.path(), &["api-key", "list"]).await;
    let row = list.lines().find(|l| l.contains("worker")).unwrap().to_string();
    let prefix = row.split_whitespace().nth(1).unwrap().to_string();
    assert!(prefix.starts_with("cdbm_"), "{row}");
    let (ok, _, err) = run(&d.env, d.dir.path(), &["api-key", "revoke", &prefix]).await;
    assert!(ok, "{err}");
    let (_, list, _) = run(&d.env, d.dir.path(), &["api-key", "list"]).await;
    assert!(list.lines().any(|l| l.contains(&prefix) && l.contains("revoked")), "{list}");
    let (ok, _, err) = run(&d.env, d.dir.path(), &["api-key", "revoke", &prefix]).await;
    assert!(!ok && err.contains("already revoked"), "{err}");
    let (ok, _, err) = run(&d.env, d.dir.path(), &["api-key", "revoke", "cdbm_nothere"]).await;
    assert!(!ok && err.contains("no API key has this id or prefix"), "{err}");
    // Not even a whole key pasted by mistake is repeated.
    let (ok, _, err) = run(&d.env, d.dir.path(), &["api-key", "revoke", &first_key]).await;
    assert!(!ok && err.contains("no API key has this id or prefix") && !err.contains(&first_key), "{err}");
    let (ok, _, err) = run(&d.env, d.dir.path(), &["api-key", "revoke", &uuid::Uuid::now_v7().to_string()]).await;
    assert!(!ok && err.contains("no API key with id"), "{err}");
    // The name is free again once its key is revoked.
    let (ok, _, err) = create("worker").await;
    assert!(ok, "{err}");
}

/// Issue 13 item 7: a key revoked with the CLI is refused by every running instance within the
/// cache period (`CENTRALDB_API_KEY_CACHE_SECS`, default 1 s). Two server processes on one
/// database both use the key (so both have it cached) until the revocation; a request sent a
/// second after `revoke` returned is refused by both. The measured times are printed.
#[tokio::test]
async fn a_revoked_key_is_refused_by_every_instance_within_a_second() {
    let d = Deployment::new().await;
    let a = Server::start(&d.env, d.dir.path()).await;
    let b = Server::start(&d.env, d.dir.path()).await;
    let (ok, key, err) =
        run(&d.env, d.dir.path(), &["api-key", "create", "--name", "doomed", "--scope", "tokens:read"]).await;
    assert!(ok, "{err}");
    let key = key.trim().to_string();
    let http = reqwest::Client::new();
    let status = |srv: &Server| http.get(srv.url(&tokens_path("nobody"))).bearer_auth(&key).send();
    for srv in [&a, &b] {
        assert_eq!(status(srv).await.unwrap().status(), 404, "the key works before");
    }
    // Keep both caches hot while the CLI revokes.
    let (ok, _, err) = run(&d.env, d.dir.path(), &["api-key", "revoke", "--", &key[..12]]).await;
    let revoked = std::time::Instant::now();
    assert!(ok, "{err}");
    let mut first_refusal = [None, None];
    while revoked.elapsed() < Duration::from_millis(1000) {
        for (i, srv) in [&a, &b].into_iter().enumerate() {
            if first_refusal[i].is_none() && status(srv).await.unwrap().status() == 401 {
                first_refusal[i] = Some(revoked.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while revoked.elapsed() < Duration::from_millis(1000) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for srv in [&a, &b] {
        assert_eq!(status(srv).await.unwrap().status(), 401, "still accepted 1 s after the revocation");
    }
    eprintln!("revocation took effect after {first_refusal:?} (instance a, b; None = only at the 1 s check)");
    a.stop().await;
    b.stop().await;
}

/// Issue 13 item 7: `migrate` checks the keyring as `serve` does: a keyring serve refuses makes
/// migrate fail with the same message.
#[tokio::test]
async fn migrate_refuses_a_keyring_serve_refuses() {
    let d = Deployment::new().await;
    let s = Server::start(&d.env, d.dir.path()).await;
    let r = reqwest::Client::new()
        .put(s.url(&tokens_path("k")))
        .bearer_auth(d.admin_key())
        .json(&garth_body("k"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    s.stop().await;
    let last_error = |err: &str| err.lines().rfind(|l| l.starts_with("error: ")).unwrap_or_default().to_string();
    for wrong in [key_spec("k1"), key_spec("k9")] {
        let env = d.with("CENTRALDB_ENCRYPTION_KEYS", &wrong);
        let (serve_ok, _, serve_err) = run(&env, d.dir.path(), &["serve"]).await;
        let (migrate_ok, _, migrate_err) = run(&env, d.dir.path(), &["migrate"]).await;
        assert!(!serve_ok && !migrate_ok, "{serve_err}\n{migrate_err}");
        assert!(last_error(&serve_err).contains("'k1'"), "{serve_err}");
        assert_eq!(last_error(&migrate_err), last_error(&serve_err));
    }
    let (ok, _, err) = run(&d.env, d.dir.path(), &["migrate"]).await;
    assert!(ok, "the right keyring migrates: {err}");
}

/// Issue 13 item 7: `--help` lists the environment variables (generated from the settings table).
#[tokio::test]
async fn help_documents_the_environment() {
    let d = Deployment::new().await;
    let (ok, out, err) = run(&d.env, d.dir.path(), &["--help"]).await;
    assert!(ok, "{err}");
    for var in centraldb_mfa::config::ENV_VARS {
        assert!(out.contains(var.name), "--help misses {}: {out}", var.name);
    }
    assert!(out.contains("CENTRALDB_API_KEY_CACHE_SECS") && out.contains("[default: 1]"), "{out}");
}

/// Issue 13 item 5: after a mixed workload (token writes and reads, a long poll, leases, MFA
/// checks, a sweeper pass), every family on `/metrics` has `# HELP` and `# TYPE`, the families an
/// operator graphs are there, and the long poll is in its own histogram (not the GET latency).
#[tokio::test]
async fn metrics_describe_every_family_after_a_mixed_workload() {
    let d = Deployment::new().await;
    let s = Server::start(&d.with("CENTRALDB_SWEEP_INTERVAL_SECS", "1"), d.dir.path()).await;
    let http = reqwest::Client::new();
    let key = d.admin_key();
    let path = tokens_path("metered");
    let r = http.put(s.url(&path)).bearer_auth(&key).json(&garth_body("m")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(http.get(s.url(&path)).bearer_auth(&key).send().await.unwrap().status(), 200);
    let poll = http.get(s.url(&format!("{path}?newer_than=1&wait_seconds=1"))).bearer_auth(&key).send();
    assert_eq!(poll.await.unwrap().status(), 304);
    let lease = |holder: &'static str| {
        http.post(s.url(&format!("{path}/lease"))).bearer_auth(&key).json(&json!({"holder": holder})).send()
    };
    assert_eq!(lease("w1").await.unwrap().status(), 201);
    assert_eq!(lease("w2").await.unwrap().status(), 409);
    let ch: Value = http
        .post(s.url("/api/v1/mfa/challenges"))
        .bearer_auth(&key)
        .json(&json!({"user_id": "metered", "method": "email", "destination": "j@example.com", "verifier": "service"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (id, code) = (ch["id"].as_str().unwrap(), ch["code"].as_str().unwrap());
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let verify = |c: &str| {
        http.post(s.url(&format!("/api/v1/mfa/challenges/{id}/verify")))
            .bearer_auth(&key)
            .json(&json!({"code": c}))
            .send()
    };
    assert_eq!(verify(wrong).await.unwrap().status(), 400);
    assert_eq!(verify(code).await.unwrap().status(), 200);
    assert_eq!(http.get(s.url(&path)).send().await.unwrap().status(), 401);

    let scrape = || async { http.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap() };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape().await;
        if text.lines().any(|l| l.starts_with("centraldb_sweeper_runs_total{outcome=\"ok\"} ") && !l.ends_with(" 0")) {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "no sweeper pass: {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let described = |kind: &str| -> std::collections::BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(kind))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    };
    let (help, types) = (described("# HELP "), described("# TYPE "));
    assert_eq!(help, types, "every family has both HELP and TYPE");
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains(*f)))
            .unwrap_or(name);
        assert!(help.contains(family), "{family} has no # HELP:\n{text}");
    }
    for family in [
        "http_requests_total",
        "http_request_duration_seconds",
        "centraldb_longpoll_duration_seconds",
        "centraldb_longpoll_waiters",
        "centraldb_longpoll_waiters_limit",
        "centraldb_unavailable_responses_total",
        "centraldb_db_pool_connections",
        "centraldb_db_pool_max_connections",
        "centraldb_db_acquire_seconds",
        "centraldb_db_acquire_timeouts_total",
        "centraldb_argon2_admitted",
        "centraldb_argon2_capacity",
        "centraldb_argon2_rejections_total",
        "centraldb_argon2_hash_seconds",
        "centraldb_sweeper_runs_total",
        "centraldb_sweeper_items_total",
        "centraldb_sweeper_last_success_timestamp_seconds",
        "centraldb_audit_events_total",
        "centraldb_lease_events_total",
        "centraldb_mfa_outcomes_total",
        "centraldb_token_bundles",
        "centraldb_build_info",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(help.contains(family), "{family} missing:\n{text}");
    }
    if backend() == Backend::Sqlite {
        assert!(help.contains("centraldb_sqlite_group_commit_batch_size"), "{text}");
    }
    let value = |prefix: &str, parts: &[&str]| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix) && parts.iter().all(|p| l.contains(p)))
            .unwrap_or_else(|| panic!("no {prefix} {parts:?}:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("centraldb_longpoll_duration_seconds_count", &[]), 1.0);
    let tokens = r#"path="/api/v1/users/{user_id}/tokens""#;
    // The plain GET and the refused one are in the latency histogram; the long poll is not.
    assert_eq!(value("http_request_duration_seconds_count", &[r#"method="GET""#, tokens]), 2.0);
    assert_eq!(value("centraldb_lease_events_total", &[r#"event="granted""#]), 1.0);
    assert_eq!(value("centraldb_lease_events_total", &[r#"event="refused""#]), 1.0);
    assert_eq!(value("centraldb_mfa_outcomes_total", &[r#"verifier="service""#, r#"outcome="invalid_code""#]), 1.0);
    assert_eq!(value("centraldb_mfa_outcomes_total", &[r#"verifier="service""#, r#"outcome="verified""#]), 1.0);
    assert_eq!(value("centraldb_argon2_hash_seconds_count", &[]), 3.0, "one hash, two checks");
    assert_eq!(value("centraldb_token_bundles", &[r#"key_id="k1""#]), 1.0);
    assert!(value("centraldb_audit_events_total", &[r#"outcome="written""#]) >= 5.0);
    assert!(value("centraldb_build_info", &[concat!("version=\"", env!("CARGO_PKG_VERSION"), "\"")]) == 1.0);
    assert!(value("process_resident_memory_bytes", &[]) > 1e6);
    assert!(value("process_open_fds", &[]) > 3.0);
    assert!(value("centraldb_sweeper_last_success_timestamp_seconds", &[]) > 1.7e9);
    s.stop().await;
}
