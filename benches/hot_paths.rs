//! Micro-benchmarks of the request hot paths: `cargo bench --bench hot_paths`.
//!
//! - `envelope`: AES-256-GCM encrypt / decrypt of a ~1 KiB garth bundle (`Keyring`,
//!   `Aad::token_bundle`), as the vault does on every PUT / GET.
//! - `api_key`: the SHA-256 of a presented key, and `ApiKeys::authenticate` with a warm cache
//!   (what every authenticated request pays).
//! - `vault_get`: a whole token read through the store (`Vault::get`: write transaction,
//!   decrypt, `last_used_at` update, chained audit row, commit) on a temp SQLite file, with
//!   `synchronous=FULL` (the default) and `NORMAL` for comparison.
//! - `argon2`: one code verification with the default (OWASP) parameters through `CodeHasher`.
//! - `pending_cap` (issue 16 item 3): the service-wide pending-challenge check with 1,000 and
//!   100,000 pending challenges in the table: the old `COUNT(*)` over the live pending ones
//!   beside the counter rows that replace it, and a whole external challenge creation
//!   (`Mfa::create`, which runs the check) at both sizes.
//!
//! Each benchmark measures for 3 s after a 1 s warm-up, so the whole run takes about a minute
//! or two. Filter with e.g. `cargo bench --bench hot_paths -- vault_get`.

use std::{collections::HashMap, hint::black_box, time::Duration};

use centraldb_mfa::{
    AppState,
    config::{Argon2Settings, Settings},
    crypto::{Aad, Keyring, api_keys},
    domain::{
        TokenBundle, UserId,
        mfa::{Method, Verifier},
    },
    services::{audit::AuditContext, code_hasher::CodeHasher, mfa::NewChallenge, tokens::Precondition},
    startup,
    store::{self, Db},
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use zeroize::Zeroizing;

const ADMIN_KEY: &str = "bench-bootstrap-admin-key-0123456789abcdef";

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

fn key_spec() -> String {
    use base64::Engine;
    format!("k1:{}", base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>()))
}

/// A realistic garth bundle: the access token padded to JWT-like length, ~1 KiB as stored.
fn garth_body(tag: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"kind": "garth",
        "oauth1_token": {"oauth_token": format!("o1tok-{tag}-0123456789abcdef0123456789"),
                         "oauth_token_secret": format!("o1sec-{tag}-0123456789abcdef0123456789"),
                         "mfa_token": null, "mfa_expiration_timestamp": null, "domain": "garmin.com"},
        "oauth2_token": {"scope": "CONNECT_READ CONNECT_WRITE", "jti": format!("jti-{tag}"), "token_type": "Bearer",
                         "access_token": format!("acc-{tag}-{}", "a".repeat(560)),
                         "refresh_token": format!("ref-{tag}-0123456789abcdef0123456789"),
                         "expires_in": 86_400, "expires_at": now + 86_400,
                         "refresh_token_expires_in": 2_592_000, "refresh_token_expires_at": now + 2_592_000}})
}

fn bundle(tag: &str) -> TokenBundle {
    TokenBundle::from_body(garth_body(tag)).expect("valid garth body")
}

/// An app state on a fresh SQLite file in `dir`, like tests/api/helpers.rs builds it.
fn build_state(rt: &Runtime, dir: &std::path::Path, synchronous: &str) -> AppState {
    let vars: HashMap<&str, String> = [
        // Above any table size benchmarked, so creations are never refused.
        ("CENTRALDB_MFA_MAX_PENDING_GLOBAL", "10000000".to_string()),
        ("CENTRALDB_DATA_DIR", dir.display().to_string()),
        ("CENTRALDB_DATABASE_URL", format!("sqlite://{}", dir.join("bench.db").display())),
        ("CENTRALDB_ENCRYPTION_KEYS", key_spec()),
        ("CENTRALDB_BOOTSTRAP_ADMIN_KEY", ADMIN_KEY.to_string()),
        ("CENTRALDB_SQLITE_SYNCHRONOUS", synchronous.to_string()),
        // Longer than any benchmark: authenticate stays a cache hit.
        ("CENTRALDB_API_KEY_CACHE_SECS", "3600".to_string()),
    ]
    .into_iter()
    .collect();
    let settings = Settings::from_lookup(|k| vars.get(k).cloned()).expect("settings");
    rt.block_on(startup::build_state(settings)).expect("app state")
}

fn envelope(c: &mut Criterion) {
    let ring = Keyring::parse(&secrecy::SecretString::from(key_spec())).expect("keyring");
    let b = bundle("bench-user");
    let plaintext: &[u8] = &b.plaintext;
    let aad = Aad::token_bundle("bench-user", "garth");
    let sealed = ring.encrypt(plaintext, &aad);
    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Bytes(plaintext.len() as u64));
    g.bench_function(format!("encrypt_{}B", plaintext.len()), |bch| {
        bch.iter(|| ring.encrypt(black_box(plaintext), black_box(&aad)))
    });
    g.bench_function(format!("decrypt_{}B", plaintext.len()), |bch| {
        bch.iter(|| ring.decrypt(black_box(&sealed), black_box(&aad)).expect("decrypts"))
    });
    // What the vault pays per call besides the cipher: building the AAD.
    g.bench_function("aad_token_bundle", |bch| {
        bch.iter(|| Aad::token_bundle(black_box("bench-user"), black_box("garth")))
    });
    g.finish();
}

fn api_key(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let state = build_state(&rt, dir.path(), "full");
    let key = api_keys::generate();
    let mut g = c.benchmark_group("api_key");
    g.bench_function("sha256_hash", |b| b.iter(|| api_keys::hash(black_box(key.as_str()))));
    // Warm the cache once, then every call is a hit: hash + mutex + HashMap lookup + clone.
    rt.block_on(state.api_keys.authenticate(ADMIN_KEY)).expect("bootstrap key authenticates");
    g.bench_function("authenticate_warm_cache", |b| {
        b.iter(|| rt.block_on(state.api_keys.authenticate(black_box(ADMIN_KEY))).expect("authenticates"))
    });
    g.finish();
    drop(state);
    drop(dir);
}

fn vault_get(c: &mut Criterion) {
    let mut g = c.benchmark_group("vault_get");
    for sync in ["full", "normal"] {
        let rt = runtime();
        let dir = tempfile::tempdir().expect("temp dir");
        let state = build_state(&rt, dir.path(), sync);
        let user = UserId::parse("bench-user").expect("user id");
        let ctx = AuditContext {
            actor: Some("key:00000000-0000-0000-0000-000000000000".into()),
            request_id: Some("0190f000-0000-7000-8000-000000000000".into()),
            source_ip: Some("127.0.0.1".into()),
        };
        rt.block_on(state.vault.put(&ctx, &user, bundle("bench-user"), Precondition::None, None)).expect("put");
        g.bench_function(format!("sqlite_synchronous_{sync}"), |b| {
            b.iter(|| rt.block_on(state.vault.get(&ctx, &user, None)).expect("get"))
        });
        rt.block_on(state.db.close());
    }
    g.finish();
}

fn argon2(c: &mut Criterion) {
    let rt = runtime();
    let params = Argon2Settings::default();
    let hasher = CodeHasher::new(params, 1, 64).expect("hasher");
    let phc = rt.block_on(hasher.hash(Zeroizing::new("482913".into()))).expect("hash");
    let mut g = c.benchmark_group("argon2");
    g.sample_size(10);
    g.bench_function(format!("verify_m{}_t{}_p{}", params.memory_kib, params.iterations, params.parallelism), |b| {
        b.iter(|| {
            let ok = rt.block_on(hasher.verify(Zeroizing::new("482913".into()), phc.clone())).expect("verify");
            assert!(ok);
        })
    });
    g.finish();
}

fn bench_ctx() -> AuditContext {
    AuditContext {
        actor: Some("key:00000000-0000-0000-0000-000000000000".into()),
        request_id: Some("0190f000-0000-7000-8000-000000000000".into()),
        source_ip: Some("127.0.0.1".into()),
    }
}

/// Inserts `n` live pending challenges (one user each) in one statement; the counter triggers run.
fn seed_pending(rt: &Runtime, db: &Db, n: i64) {
    let Db::Sqlite { pool, .. } = db else { panic!("SQLite only") };
    let now = store::now();
    let expires = now + chrono::Duration::hours(1);
    let sql = "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < $1) \
               INSERT INTO challenges (id, user_id, method, verifier, destination, status, attempts, max_attempts, \
               expires_at, created_at, updated_at) \
               SELECT randomblob(16), 'seed-' || i, 'email', 'external', 'r***@example.com', 'pending', 0, 5, $2, $3, $3 \
               FROM s";
    rt.block_on(sqlx::query(sql).bind(n).bind(expires).bind(now).execute(pool)).expect("seed challenges");
}

fn pending_cap(c: &mut Criterion) {
    let mut g = c.benchmark_group("pending_cap");
    for rows in [1_000i64, 100_000] {
        let rt = runtime();
        let dir = tempfile::tempdir().expect("temp dir");
        let state = build_state(&rt, dir.path(), "normal");
        seed_pending(&rt, &state.db, rows);
        g.bench_function(format!("old_count_live_pending_{rows}"), |b| {
            // The pooled connection is taken and given back inside the runtime.
            b.iter(|| {
                rt.block_on(async {
                    let mut rc = state.db.read().await.expect("read");
                    let n = store::challenges::count_pending_global_upto(&mut rc.conn(), store::now(), i64::MAX)
                        .await
                        .expect("count");
                    assert!(n >= rows);
                })
            })
        });
        g.bench_function(format!("counter_rows_{rows}"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut rc = state.db.read().await.expect("read");
                    let n = store::challenges::pending_upper_bound(&mut rc.conn()).await.expect("counter");
                    assert!(n >= rows);
                })
            })
        });
        let ctx = bench_ctx();
        let mut i = 0u64;
        g.bench_function(format!("create_external_challenge_{rows}"), |b| {
            b.iter(|| {
                i += 1;
                let new = NewChallenge {
                    user: UserId::parse(&format!("bench-{i}")).expect("user id"),
                    session_id: None,
                    method: Method::Email,
                    verifier: Verifier::External,
                    destination: Some("r***@example.com".into()),
                    code: None,
                    ttl_secs: 600,
                    max_attempts: 5,
                    resume_state: Some(Zeroizing::new("r".repeat(2048))),
                };
                rt.block_on(state.mfa.create(&ctx, new)).expect("create")
            })
        });
        rt.block_on(state.db.close());
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = envelope, api_key, vault_get, argon2, pending_cap
}
criterion_main!(benches);
