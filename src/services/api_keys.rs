//! API keys: create, list, revoke, bootstrap, and the request-time check with a short cache.
//!
//! A presented key is hashed (SHA-256) and looked up by hash; the stored hash is then compared
//! in constant time. Verified keys are cached for `CENTRALDB_API_KEY_CACHE_SECS` (default 1 s)
//! so auth costs at most one query per key and second. Unknown keys are never cached (no memory
//! growth from guessing). A key revoked with `api-key revoke` (another process) stops working on
//! every instance within that period (`tests/api/binary.rs` measures it with two processes).
//!
//! No timing oracle: an unknown key and a revoked one get the same 401, and take the same time.
//! The check query returns exactly one row of the same shape for both (a `LEFT JOIN` from a
//! one-row table), both are compared and swept from the cache alike; only a valid key then
//! reads its full row. (Looking keys up by their full hash also means a right prefix with a
//! wrong secret is just an unknown key.) `scripts/timing-oracle.py` measures this over HTTP.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::{
    crypto::api_keys::{self, KeyHash},
    domain::{Scope, Scopes},
    store::{self, Db, StoreError, api_keys::ApiKeyRow},
};

pub const BOOTSTRAP_NAME: &str = "bootstrap";
pub const FIRST_RUN_NAME: &str = "first-run admin";
pub const ADMIN_KEY_FILE: &str = "admin-api-key";

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: Uuid,
    pub name: String,
    pub scopes: Scopes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    Unknown,
    Revoked,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing_key",
            Self::Malformed => "malformed_authorization",
            Self::Unknown => "unknown_key",
            Self::Revoked => "revoked_key",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication failed: {}", .0.as_str())]
    Failure(AuthFailure),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the cache of verified keys knows about a presented key (see [`ApiKeys::cached`]).
#[derive(Debug, Clone)]
pub enum CacheHit {
    Fresh(Principal),
    Stale,
    Unknown,
}

struct Cached {
    principal: Principal,
    fetched: Instant,
    /// Taken by the one request that re-checks this key once its cache period is over; the
    /// others wait for it and use its result (one query per key and period, not one per request).
    refresh: Arc<tokio::sync::Mutex<()>>,
}

pub struct ApiKeys {
    db: Db,
    ttl: Duration,
    cache: Mutex<HashMap<KeyHash, Cached>>,
    /// When each valid key's `last_used_at` was last written (one entry per valid key).
    touched: Mutex<HashMap<Uuid, Instant>>,
}

/// `last_used_at` is written at most this often per key and process (the cache period is short,
/// so a write per cache refresh would be one write per key per second).
const TOUCH_INTERVAL: Duration = Duration::from_secs(60);

/// A key as listed (never the key itself).
#[derive(Debug, Clone)]
pub struct ApiKeyInfo {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub scopes: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRow> for ApiKeyInfo {
    fn from(r: ApiKeyRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            prefix: r.prefix,
            scopes: r.scopes,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
        }
    }
}

impl ApiKeys {
    pub fn new(db: Db, ttl: Duration) -> Self {
        Self { db, ttl, cache: Mutex::new(HashMap::new()), touched: Mutex::new(HashMap::new()) }
    }

    /// Checks a presented key. The outcome is logged at trace level (never the key itself).
    pub async fn authenticate(&self, presented: &str) -> Result<Principal, AuthError> {
        let result = self.check(presented).await;
        match &result {
            Ok(p) => tracing::trace!(key_id = %p.key_id, "API key accepted"),
            Err(AuthError::Failure(f)) => tracing::trace!(reason = f.as_str(), "API key refused"),
            Err(AuthError::Store(_)) => {}
        }
        result
    }

    /// Whether a presented key is in the cache of verified keys, without a query: `Fresh` (within
    /// the cache period), `Stale` (verified before, due for a re-check) or `Unknown`.
    pub fn cached(&self, presented: &str) -> CacheHit {
        let hash = api_keys::hash(presented);
        let Ok(cache) = self.cache.lock() else { return CacheHit::Unknown };
        match cache.get(&hash) {
            Some(c) if c.fetched.elapsed() < self.ttl => CacheHit::Fresh(c.principal.clone()),
            Some(_) => CacheHit::Stale,
            None => CacheHit::Unknown,
        }
    }

    /// The cached principal while fresh; else the key's refresh lock when it was verified before.
    fn lookup(&self, hash: &KeyHash) -> Result<Principal, Option<Arc<tokio::sync::Mutex<()>>>> {
        let Ok(cache) = self.cache.lock() else { return Err(None) };
        match cache.get(hash) {
            Some(c) if c.fetched.elapsed() < self.ttl => Ok(c.principal.clone()),
            Some(c) => Err(Some(c.refresh.clone())),
            None => Err(None),
        }
    }

    async fn check(&self, presented: &str) -> Result<Principal, AuthError> {
        let hash = api_keys::hash(presented);
        let refresh = match self.lookup(&hash) {
            Ok(p) => return Ok(p),
            Err(refresh) => refresh,
        };
        // A known key due for a re-check: one request queries, the others wait and reuse its
        // result (a burst after the cache period costs one query, not one per request).
        let _refreshing = match &refresh {
            Some(m) => {
                let guard = m.lock().await;
                if let Ok(p) = self.lookup(&hash) {
                    return Ok(p);
                }
                Some(guard)
            }
            None => None,
        };
        let mut conn = self.db.read().await?;
        let (id, stored, revoked) = store::api_keys::check(&mut conn.conn(), &hash).await?;
        // The same work whether or not a key matched: a constant-time compare (against zeros
        // when nothing matched) and a sweep of the cache (for nothing when nothing matched).
        let matched = api_keys::hashes_equal(&hash, stored.as_deref().unwrap_or(&[0u8; 32]));
        let failure = match id {
            Some(_) if matched && !revoked => None,
            Some(_) if matched => Some(AuthFailure::Revoked),
            _ => Some(AuthFailure::Unknown),
        };
        if let Some(f) = failure {
            drop(conn);
            self.forget(if f == AuthFailure::Revoked { id.unwrap_or_else(Uuid::nil) } else { Uuid::nil() });
            return Err(AuthError::Failure(f));
        }
        // A valid key: its full row (a revoke in between counts).
        let row = store::api_keys::find_by_hash(&mut conn.conn(), &hash).await?;
        drop(conn);
        let row = match row {
            Some(r) if Some(r.id) == id && r.revoked_at.is_none() => r,
            Some(r) if r.revoked_at.is_some() => return Err(AuthError::Failure(AuthFailure::Revoked)),
            _ => return Err(AuthError::Failure(AuthFailure::Unknown)),
        };
        let scopes = Scopes::parse_list(&row.scopes).map_err(StoreError::Other)?;
        let principal = Principal { key_id: row.id, name: row.name, scopes };
        if let Ok(mut cache) = self.cache.lock() {
            let refresh = refresh.clone().unwrap_or_default();
            cache.insert(hash, Cached { principal: principal.clone(), fetched: Instant::now(), refresh });
        }
        // `last_used_at` is refreshed at most once per `TOUCH_INTERVAL`, not per request.
        let due = self.touched.lock().is_ok_and(|mut t| {
            let now = Instant::now();
            let due = t.get(&principal.key_id).is_none_or(|at| now.duration_since(*at) >= TOUCH_INTERVAL);
            if due {
                t.insert(principal.key_id, now);
            }
            due
        });
        if !due {
            return Ok(principal);
        }
        let db = self.db.clone();
        let id = principal.key_id;
        // One unconditional row update with no audit event: it needs no lock beyond its row, so
        // it never queues (holding a pool connection) behind the common write lock.
        tokio::spawn(async move {
            if let Ok(mut tx) = db.begin_write_for(&[]).await
                && store::api_keys::touch_last_used(&mut tx.conn(), id, store::now()).await.is_ok()
            {
                let _ = tx.commit().await;
            }
        });
        Ok(principal)
    }

    /// Drops a key from the cache (after revocation).
    pub fn forget(&self, id: Uuid) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|_, c| c.principal.key_id != id);
        }
    }
}

/// Creates a key and returns it (shown once) with its id.
pub async fn create(db: &Db, name: &str, scopes: &Scopes) -> Result<(Uuid, Zeroizing<String>), StoreError> {
    let key = api_keys::generate();
    let id = insert_key(db, name, scopes, &key).await?;
    Ok((id, key))
}

fn new_row(id: Uuid, name: &str, scopes: &Scopes, key: &str) -> ApiKeyRow {
    ApiKeyRow {
        id,
        name: name.to_string(),
        prefix: api_keys::display_prefix(key),
        key_hash: api_keys::hash(key).to_vec(),
        scopes: scopes.to_stored(),
        created_at: store::now(),
        last_used_at: None,
        revoked_at: None,
    }
}

async fn insert_key(db: &Db, name: &str, scopes: &Scopes, key: &str) -> Result<Uuid, StoreError> {
    let id = Uuid::now_v7();
    let row = new_row(id, name, scopes, key);
    let mut tx = db.begin_write().await?;
    store::api_keys::insert(&mut tx.conn(), &row).await?;
    tx.commit().await?;
    Ok(id)
}

/// Creates a key unless an active key already has this name (then `None`). The check and the
/// insert share one write transaction, and write transactions are serialised on both backends
/// (SQLite's single writer; PostgreSQL's audit-head row lock, see [`Db::begin_write`]), so two
/// concurrent creates of one name cannot both pass.
pub async fn create_unique(
    db: &Db,
    name: &str,
    scopes: &Scopes,
) -> Result<Option<(Uuid, Zeroizing<String>)>, StoreError> {
    let key = api_keys::generate();
    let id = Uuid::now_v7();
    let mut tx = db.begin_write().await?;
    if store::api_keys::count_active_named(&mut tx.conn(), name).await? > 0 {
        return Ok(None);
    }
    store::api_keys::insert(&mut tx.conn(), &new_row(id, name, scopes, &key)).await?;
    tx.commit().await?;
    Ok(Some((id, key)))
}

/// The key `api-key revoke` means by `given`: its id, or the prefix `api-key list` shows (an
/// active key's, unique among active keys). A clear message otherwise, which never repeats what
/// was given (an operator who pastes a whole key by mistake must not find it in a log).
pub fn find_for_revoke(keys: &[ApiKeyInfo], given: &str) -> Result<Uuid, String> {
    let given = given.trim();
    if let Ok(id) = given.parse::<Uuid>() {
        return match keys.iter().find(|k| k.id == id) {
            Some(k) => Ok(k.id),
            None => Err(format!("no API key with id {id}")),
        };
    }
    let matching: Vec<&ApiKeyInfo> = keys.iter().filter(|k| k.prefix == given).collect();
    let active: Vec<&&ApiKeyInfo> = matching.iter().filter(|k| k.revoked_at.is_none()).collect();
    match (active.as_slice(), matching.len()) {
        ([one], _) => Ok(one.id),
        ([], 0) => Err("no API key has this id or prefix (see `api-key list`)".to_string()),
        ([], _) => Err("the API key with this prefix is already revoked".to_string()),
        (many, _) => Err(format!(
            "{} active API keys have this prefix; revoke by id: {}",
            many.len(),
            many.iter().map(|k| k.id.to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}

pub async fn list(db: &Db) -> Result<Vec<ApiKeyInfo>, StoreError> {
    let mut c = db.read().await?;
    Ok(store::api_keys::list(&mut c.conn()).await?.into_iter().map(Into::into).collect())
}

pub async fn revoke(db: &Db, id: Uuid) -> Result<bool, StoreError> {
    let mut tx = db.begin_write().await?;
    let done = store::api_keys::revoke(&mut tx.conn(), id, store::now()).await?;
    tx.commit().await?;
    Ok(done)
}

/// Makes the configured bootstrap key valid (admin scope), and revokes an earlier bootstrap key
/// that the configuration no longer names. A bootstrap key revoked by an operator stays revoked.
pub async fn ensure_bootstrap(db: &Db, key: &str) -> Result<(), StoreError> {
    let hash = api_keys::hash(key);
    let existing = {
        let mut c = db.read().await?;
        store::api_keys::find_by_hash(&mut c.conn(), &hash).await?
    };
    match existing {
        Some(row) if row.revoked_at.is_some() => {
            tracing::warn!(key_id = %row.id, "CENTRALDB_BOOTSTRAP_ADMIN_KEY names a revoked key; it stays revoked");
        }
        Some(_) => {}
        None => {
            let id = insert_key(db, BOOTSTRAP_NAME, &Scopes::new(vec![Scope::Admin]), key).await?;
            tracing::info!(key_id = %id, "bootstrap admin key registered");
        }
    }
    let mut tx = db.begin_write().await?;
    let n = store::api_keys::revoke_named_except(&mut tx.conn(), BOOTSTRAP_NAME, &hash, store::now()).await?;
    tx.commit().await?;
    if n > 0 {
        tracing::info!(revoked = n, "revoked bootstrap key(s) no longer configured");
    }
    Ok(())
}

/// On a store with no usable key and no bootstrap key: creates an admin key and writes it to
/// `<data>/admin-api-key` (mode 0600). Returns the file path when it did.
pub async fn ensure_first_admin(db: &Db, data_dir: &Path) -> Result<Option<std::path::PathBuf>, String> {
    let active = {
        let mut c = db.read().await.map_err(|e| e.to_string())?;
        store::api_keys::count_active(&mut c.conn()).await.map_err(|e| e.to_string())?
    };
    if active > 0 {
        return Ok(None);
    }
    // The file is written before the key is stored, so a stored key is never lost.
    let key = api_keys::generate();
    let path = data_dir.join(ADMIN_KEY_FILE);
    crate::private_file::write(&path, format!("{}\n", key.as_str()).as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    insert_key(db, FIRST_RUN_NAME, &Scopes::new(vec![Scope::Admin]), &key).await.map_err(|e| e.to_string())?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migrated database in `dir` and the key checker over it.
    struct State {
        db: Db,
        api_keys: ApiKeys,
    }

    async fn state(dir: &Path) -> State {
        let vars: HashMap<&str, String> = [
            ("CENTRALDB_DATA_DIR", dir.display().to_string()),
            ("CENTRALDB_DATABASE_URL", format!("sqlite://{}", dir.join("t.db").display())),
        ]
        .into_iter()
        .collect();
        let settings = crate::config::Settings::from_lookup(|k| vars.get(k).cloned()).unwrap();
        let db = Db::connect(&settings).await.unwrap();
        db.migrate().await.unwrap();
        State { api_keys: ApiKeys::new(db.clone(), settings.api_key_cache_ttl), db }
    }

    /// Unknown, right-prefix-wrong-secret and revoked keys each get their own reason (audited),
    /// through the one-row check; a valid key gets its principal.
    #[tokio::test]
    async fn the_check_tells_unknown_revoked_and_valid_apart() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(dir.path()).await;
        let scopes = Scopes::parse_list("tokens:read").unwrap();
        let (id, valid) = create(&st.db, "valid", &scopes).await.unwrap();
        let (rid, revoked) = create(&st.db, "revoked", &scopes).await.unwrap();
        assert!(revoke(&st.db, rid).await.unwrap());
        let failure = |r: Result<Principal, AuthError>| match r {
            Err(AuthError::Failure(f)) => f,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let unknown = api_keys::generate();
        assert_eq!(failure(st.api_keys.authenticate(&unknown).await), AuthFailure::Unknown);
        let wrong_secret = format!("{}{}", &valid[..12], &unknown[12..]);
        assert_eq!(failure(st.api_keys.authenticate(&wrong_secret).await), AuthFailure::Unknown);
        assert_eq!(failure(st.api_keys.authenticate(&revoked).await), AuthFailure::Revoked);
        let p = st.api_keys.authenticate(&valid).await.unwrap();
        assert_eq!((p.key_id, p.name.as_str()), (id, "valid"));
        // Revoked while cached: refused once forgotten.
        assert!(revoke(&st.db, id).await.unwrap());
        st.api_keys.forget(id);
        assert_eq!(failure(st.api_keys.authenticate(&valid).await), AuthFailure::Revoked);
    }
}
