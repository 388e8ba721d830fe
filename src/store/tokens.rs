//! `token_bundles`: one row per user; the ciphertext is NULL once destroyed (invalidation, expiry).

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

use super::{Conn, Result, StoreError};

/// Everything about a bundle but its ciphertext.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BundleRow {
    pub user_id: String,
    pub kind: String,
    pub version: i64,
    pub key_id: Option<String>,
    pub has_secret: bool,
    pub access_expires_at: Option<DateTime<Utc>>,
    pub refresh_expires_at: Option<DateTime<Utc>>,
    pub reauth_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    /// The random id of the write that stored the ciphertext (bound into its associated data);
    /// `None` once destroyed, and on legacy rows written before write ids existed.
    pub write_id: Option<Uuid>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BundleWithSecret {
    #[sqlx(flatten)]
    pub row: BundleRow,
    pub ciphertext: Option<Vec<u8>>,
}

macro_rules! meta_cols {
    () => {
        "user_id, kind, version, key_id, (ciphertext IS NOT NULL) AS has_secret, \
         access_expires_at, refresh_expires_at, reauth_reason, created_at, updated_at, last_used_at, write_id"
    };
}

/// What a write needs to store.
pub struct NewBundle<'a> {
    pub user_id: &'a str,
    pub kind: &'a str,
    pub key_id: &'a str,
    pub ciphertext: &'a [u8],
    /// Bound into `ciphertext`'s associated data, with the version the write creates.
    pub write_id: Uuid,
    pub access_expires_at: Option<DateTime<Utc>>,
    pub refresh_expires_at: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

/// The precondition of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCondition {
    None,
    /// `If-Match`: the stored version must equal this.
    VersionIs(i64),
    /// `If-Match: *`: a bundle must exist.
    Exists,
    /// `If-None-Match: *`: no usable bundle may exist.
    Absent,
}

pub async fn get(c: &mut Conn<'_>, user_id: &str) -> Result<Option<BundleRow>> {
    const SQL: &str = concat!("SELECT ", meta_cols!(), " FROM token_bundles WHERE user_id = $1");
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(user_id).fetch_optional(c).await)?)
}

/// The bundles (with ciphertext) of many users in one statement; absent users are left out.
pub async fn get_many_with_secret(c: &mut Conn<'_>, user_ids: &[&str]) -> Result<Vec<BundleWithSecret>> {
    const SQLITE: &str = concat!(
        "SELECT ",
        meta_cols!(),
        ", ciphertext FROM token_bundles WHERE user_id IN (SELECT value FROM json_each($1))"
    );
    const POSTGRES: &str = concat!("SELECT ", meta_cols!(), ", ciphertext FROM token_bundles WHERE user_id = ANY($1)");
    if user_ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(match c {
        Conn::Sqlite(c, _) => {
            let json = serde_json::to_string(user_ids).map_err(|e| StoreError::Other(e.to_string()))?;
            sqlx::query_as(SQLITE).bind(json).fetch_all(&mut **c).await?
        }
        Conn::Postgres(c) => sqlx::query_as(POSTGRES).bind(user_ids).fetch_all(&mut **c).await?,
        Conn::Closed => return Err(sqlx::Error::PoolClosed.into()),
    })
}

/// Writes a bundle if `cond` holds, atomically; `None` when it did not hold.
/// The returned flag is true when this write created a usable bundle (none was there before).
pub async fn write(c: &mut Conn<'_>, b: &NewBundle<'_>, cond: WriteCondition) -> Result<Option<(BundleRow, bool)>> {
    // Replacing a bundle that is not usable (destroyed, or past its refresh expiry) counts as
    // creating it anew: `created_at` restarts, and `If-None-Match: *` lets it through.
    macro_rules! set_cols {
        () => {
            "kind = $2, key_id = $3, ciphertext = $4, access_expires_at = $5, \
             refresh_expires_at = $6, reauth_reason = NULL, updated_at = $7, write_id = $8"
        };
    }
    macro_rules! upsert {
        ($cond:literal) => {
            concat!(
                "INSERT INTO token_bundles (user_id, kind, key_id, ciphertext, access_expires_at, \
                   refresh_expires_at, reauth_reason, updated_at, created_at, version, last_used_at, write_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, $7, 1, NULL, $8) \
                 ON CONFLICT (user_id) DO UPDATE SET ", set_cols!(), ", version = token_bundles.version + 1, \
                   created_at = CASE WHEN token_bundles.ciphertext IS NULL OR token_bundles.refresh_expires_at <= $7 THEN $7 ELSE token_bundles.created_at END, \
                   last_used_at = CASE WHEN token_bundles.ciphertext IS NULL OR token_bundles.refresh_expires_at <= $7 THEN NULL ELSE token_bundles.last_used_at END ",
                $cond, " RETURNING ", meta_cols!()
            )
        };
    }
    const UPDATE: &str = concat!(
        "UPDATE token_bundles SET ",
        set_cols!(),
        ", version = version + 1, \
           created_at = CASE WHEN ciphertext IS NULL OR refresh_expires_at <= $7 THEN $7 ELSE created_at END, \
           last_used_at = CASE WHEN ciphertext IS NULL OR refresh_expires_at <= $7 THEN NULL ELSE last_used_at END \
         WHERE user_id = $1 AND ($9 < 0 OR version = $9) RETURNING ",
        meta_cols!()
    );
    const UPSERT: &str = upsert!("");
    const INSERT_IF_ABSENT: &str =
        upsert!("WHERE token_bundles.ciphertext IS NULL OR token_bundles.refresh_expires_at <= $7");
    let sql = match cond {
        WriteCondition::VersionIs(_) | WriteCondition::Exists => UPDATE,
        WriteCondition::None => UPSERT,
        WriteCondition::Absent => INSERT_IF_ABSENT,
    };
    let expected = match cond {
        WriteCondition::VersionIs(v) => v,
        _ => -1,
    };
    let row: Option<BundleRow> = dispatch!(c, |c| {
        let q = sqlx::query_as(sql)
            .bind(b.user_id)
            .bind(b.kind)
            .bind(b.key_id)
            .bind(b.ciphertext)
            .bind(b.access_expires_at)
            .bind(b.refresh_expires_at)
            .bind(b.now)
            .bind(b.write_id);
        let q =
            if matches!(cond, WriteCondition::VersionIs(_) | WriteCondition::Exists) { q.bind(expected) } else { q };
        q.fetch_optional(c).await
    })?;
    Ok(row.map(|r| {
        let created = r.created_at == b.now;
        (r, created)
    }))
}

/// Sets `last_used_at` of many bundles in one statement (`touches`: user id and instant, one
/// entry per user). SQLite takes them as a JSON array, PostgreSQL as two arrays.
pub async fn touch_many(c: &mut Conn<'_>, touches: &[(&str, DateTime<Utc>)]) -> Result<()> {
    if touches.is_empty() {
        return Ok(());
    }
    match c {
        Conn::Sqlite(c, _) => {
            // The instant in the text form sqlx's SQLite encoder writes for a `DateTime<Utc>`.
            let rows: Vec<(&str, String)> =
                touches.iter().map(|(u, at)| (*u, at.to_rfc3339_opts(SecondsFormat::AutoSi, false))).collect();
            let json = serde_json::to_string(&rows).map_err(|e| StoreError::Other(e.to_string()))?;
            sqlx::query(TOUCH_MANY_SQLITE).bind(json).execute(&mut **c).await?;
        }
        Conn::Postgres(c) => {
            let users: Vec<&str> = touches.iter().map(|(u, _)| *u).collect();
            let ats: Vec<DateTime<Utc>> = touches.iter().map(|(_, at)| *at).collect();
            sqlx::query(TOUCH_MANY_POSTGRES).bind(users).bind(ats).execute(&mut **c).await?;
        }
        Conn::Closed => return Err(sqlx::Error::PoolClosed.into()),
    }
    Ok(())
}

const TOUCH_MANY_SQLITE: &str = "UPDATE token_bundles SET last_used_at = v.at \
     FROM (SELECT value->>0 AS user_id, value->>1 AS at FROM json_each($1)) AS v \
     WHERE token_bundles.user_id = v.user_id";
const TOUCH_MANY_POSTGRES: &str = "UPDATE token_bundles AS t SET last_used_at = v.at \
     FROM UNNEST($1::text[], $2::timestamptz[]) AS v(user_id, at) WHERE t.user_id = v.user_id";

/// Destroys the ciphertext and remembers why; bumps the version. `None` when no row with this
/// `version` exists.
pub async fn invalidate(
    c: &mut Conn<'_>,
    user_id: &str,
    version: i64,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<Option<BundleRow>> {
    const SQL: &str = concat!(
        "UPDATE token_bundles SET ciphertext = NULL, key_id = NULL, write_id = NULL, reauth_reason = $2, \
           version = version + 1, updated_at = $3 WHERE user_id = $1 AND version = $4 RETURNING ",
        meta_cols!()
    );
    Ok(dispatch!(c, |c| sqlx::query_as(SQL)
        .bind(user_id)
        .bind(reason)
        .bind(now)
        .bind(version)
        .fetch_optional(c)
        .await)?)
}

/// Removes the row; true when there was one.
pub async fn delete(c: &mut Conn<'_>, user_id: &str) -> Result<bool> {
    let n = dispatch!(c, |c| sqlx::query("DELETE FROM token_bundles WHERE user_id = $1")
        .bind(user_id)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// Key ids that some stored ciphertext is encrypted under.
pub async fn key_ids_in_use(c: &mut Conn<'_>) -> Result<Vec<String>> {
    let sql = "SELECT DISTINCT key_id FROM token_bundles WHERE key_id IS NOT NULL";
    Ok(dispatch!(c, |c| sqlx::query_scalar(sql).fetch_all(c).await)?)
}

#[derive(Debug, sqlx::FromRow)]
pub struct RewrapCandidate {
    pub user_id: String,
    pub kind: String,
    pub version: i64,
    pub write_id: Option<Uuid>,
    pub ciphertext: Vec<u8>,
}

/// A page of bundles, in user order after `after`, to re-encrypt: those not yet under
/// `active_key_id` (unless `legacy_only`) and those with the legacy associated data (no write id).
pub async fn rewrap_page(
    c: &mut Conn<'_>,
    active_key_id: &str,
    legacy_only: bool,
    after: &str,
    limit: i64,
) -> Result<Vec<RewrapCandidate>> {
    let sql = "SELECT user_id, kind, version, write_id, ciphertext FROM token_bundles \
               WHERE ciphertext IS NOT NULL AND (write_id IS NULL OR (NOT $2 AND key_id <> $1)) AND user_id > $3 \
               ORDER BY user_id LIMIT $4";
    Ok(dispatch!(c, |c| sqlx::query_as(sql)
        .bind(active_key_id)
        .bind(legacy_only)
        .bind(after)
        .bind(limit)
        .fetch_all(c)
        .await)?)
}

/// Replaces one ciphertext (and its write id) if it is still the one read (compare-and-set); the
/// version is kept, since the content did not change.
pub async fn rewrap_one(
    c: &mut Conn<'_>,
    user_id: &str,
    old: &[u8],
    key_id: &str,
    new: &[u8],
    write_id: Uuid,
) -> Result<bool> {
    let n = dispatch!(c, |c| {
        sqlx::query(
            "UPDATE token_bundles SET ciphertext = $3, key_id = $4, write_id = $5 WHERE user_id = $1 AND ciphertext = $2",
        )
        .bind(user_id)
        .bind(old)
        .bind(new)
        .bind(key_id)
        .bind(write_id)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(n > 0)
}

/// Users whose bundle still holds ciphertext past its refresh expiry (the sweeper's work list).
pub async fn due_for_expiry(c: &mut Conn<'_>, now: DateTime<Utc>, limit: i64) -> Result<Vec<String>> {
    const SQL: &str = "SELECT user_id FROM token_bundles WHERE ciphertext IS NOT NULL AND refresh_expires_at <= $1 \
                       ORDER BY user_id LIMIT $2";
    Ok(dispatch!(c, |c| sqlx::query_scalar(SQL).bind(now).bind(limit).fetch_all(c).await)?)
}

/// Destroys the ciphertext of a bundle past its refresh expiry (conditional: a fresh write in
/// the meantime wins). Bumps the version, like any write.
pub async fn expire(c: &mut Conn<'_>, user_id: &str, now: DateTime<Utc>) -> Result<Option<BundleRow>> {
    const SQL: &str = concat!(
        "UPDATE token_bundles SET ciphertext = NULL, key_id = NULL, write_id = NULL, reauth_reason = 'refresh_expired', \
           version = version + 1, updated_at = $2 \
         WHERE user_id = $1 AND ciphertext IS NOT NULL AND refresh_expires_at <= $2 RETURNING ",
        meta_cols!()
    );
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(user_id).bind(now).fetch_optional(c).await)?)
}
