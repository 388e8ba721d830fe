//! `api_keys`: only the SHA-256 of each key is stored.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Conn, Result};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub key_hash: Vec<u8>,
    pub scopes: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

macro_rules! cols {
    () => {
        "id, name, prefix, key_hash, scopes, created_at, last_used_at, revoked_at"
    };
}

pub async fn insert(c: &mut Conn<'_>, row: &ApiKeyRow) -> Result<()> {
    const SQL: &str = concat!("INSERT INTO api_keys (", cols!(), ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8)");
    dispatch!(c, |c| sqlx::query(SQL)
        .bind(row.id)
        .bind(&row.name)
        .bind(&row.prefix)
        .bind(&row.key_hash)
        .bind(&row.scopes)
        .bind(row.created_at)
        .bind(row.last_used_at)
        .bind(row.revoked_at)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}

/// `check`'s answer: the id and stored hash of the key with the hash asked for (both `None` when
/// there is none) and whether it is revoked.
pub type KeyCheck = (Option<Uuid>, Option<Vec<u8>>, bool);

/// One row whatever the key: the id and stored hash of the key with this hash (NULL when there is
/// none) and whether it is revoked. Unknown and known keys cost the same query and decoding.
pub async fn check(c: &mut Conn<'_>, hash: &[u8]) -> Result<KeyCheck> {
    const SQL: &str = "SELECT k.id, k.key_hash, k.revoked_at IS NOT NULL AS revoked \
                       FROM (SELECT 1 AS one) AS o LEFT JOIN api_keys k ON k.key_hash = $1";
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(hash).fetch_one(c).await)?)
}

pub async fn find_by_hash(c: &mut Conn<'_>, hash: &[u8]) -> Result<Option<ApiKeyRow>> {
    const SQL: &str = concat!("SELECT ", cols!(), " FROM api_keys WHERE key_hash = $1");
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(hash).fetch_optional(c).await)?)
}

pub async fn list(c: &mut Conn<'_>) -> Result<Vec<ApiKeyRow>> {
    const SQL: &str = concat!("SELECT ", cols!(), " FROM api_keys ORDER BY created_at, id");
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).fetch_all(c).await)?)
}

pub async fn count_active(c: &mut Conn<'_>) -> Result<i64> {
    Ok(dispatch!(c, |c| sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL")
        .fetch_one(c)
        .await)?)
}

pub async fn count_active_named(c: &mut Conn<'_>, name: &str) -> Result<i64> {
    Ok(dispatch!(c, |c| sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL AND name = $1")
        .bind(name)
        .fetch_one(c)
        .await)?)
}

/// Revokes a key; true when it was active.
pub async fn revoke(c: &mut Conn<'_>, id: Uuid, now: DateTime<Utc>) -> Result<bool> {
    let n = dispatch!(c, |c| sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
        .bind(id)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// Revokes every active key with this name except the one with `keep_hash`.
pub async fn revoke_named_except(c: &mut Conn<'_>, name: &str, keep_hash: &[u8], now: DateTime<Utc>) -> Result<u64> {
    let n = dispatch!(c, |c| {
        sqlx::query("UPDATE api_keys SET revoked_at = $3 WHERE name = $1 AND key_hash <> $2 AND revoked_at IS NULL")
            .bind(name)
            .bind(keep_hash)
            .bind(now)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(n)
}

pub async fn touch_last_used(c: &mut Conn<'_>, id: Uuid, now: DateTime<Utc>) -> Result<()> {
    dispatch!(c, |c| sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
        .bind(id)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}
