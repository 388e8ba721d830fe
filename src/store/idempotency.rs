//! `idempotency_keys`: claim, finish, release and purge are single conditional statements, so
//! instances sharing the database agree on who acts for a key.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Conn, Result};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct IdempotencyRow {
    pub request_hash: Vec<u8>,
    pub hash_key_id: String,
    pub state: String,
    pub locked_until: Option<DateTime<Utc>>,
    pub response: Option<Vec<u8>>,
}

/// What a claim needs to write.
pub struct Claim<'a> {
    pub api_key_id: Uuid,
    pub key_hash: &'a [u8],
    pub request_hash: &'a [u8],
    pub hash_key_id: &'a str,
    pub owner: Uuid,
    pub locked_until: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Inserts a `running` row owned by `claim.owner`, or takes over one that has expired or whose
/// `running` lease lapsed (its instance died). `false` when a live row holds the key.
pub async fn claim(c: &mut Conn<'_>, claim: &Claim<'_>, now: DateTime<Utc>) -> Result<bool> {
    const SQL: &str = "INSERT INTO idempotency_keys (api_key_id, key_hash, request_hash, hash_key_id, state, owner, \
                         locked_until, response, created_at, expires_at) \
                       VALUES ($1, $2, $3, $4, 'running', $5, $6, NULL, $7, $8) \
                       ON CONFLICT (api_key_id, key_hash) DO UPDATE SET request_hash = excluded.request_hash, \
                         hash_key_id = excluded.hash_key_id, state = 'running', owner = excluded.owner, \
                         locked_until = excluded.locked_until, response = NULL, created_at = excluded.created_at, \
                         expires_at = excluded.expires_at \
                       WHERE idempotency_keys.expires_at <= $7 \
                          OR (idempotency_keys.state = 'running' AND idempotency_keys.locked_until <= $7)";
    let n = dispatch!(c, |c| sqlx::query(SQL)
        .bind(claim.api_key_id)
        .bind(claim.key_hash)
        .bind(claim.request_hash)
        .bind(claim.hash_key_id)
        .bind(claim.owner)
        .bind(claim.locked_until)
        .bind(now)
        .bind(claim.expires_at)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// The record of a key, if any.
pub async fn get(c: &mut Conn<'_>, api_key_id: Uuid, key_hash: &[u8]) -> Result<Option<IdempotencyRow>> {
    const SQL: &str = "SELECT request_hash, hash_key_id, state, locked_until, response FROM idempotency_keys \
                       WHERE api_key_id = $1 AND key_hash = $2";
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(api_key_id).bind(key_hash).fetch_optional(c).await)?)
}

/// Stores the answer of the claim `owner` holds. `false` when the claim was lost meanwhile.
pub async fn finish(c: &mut Conn<'_>, api_key_id: Uuid, key_hash: &[u8], owner: Uuid, response: &[u8]) -> Result<bool> {
    const SQL: &str = "UPDATE idempotency_keys SET state = 'done', owner = NULL, locked_until = NULL, response = $4 \
                       WHERE api_key_id = $1 AND key_hash = $2 AND owner = $3 AND state = 'running'";
    let n = dispatch!(c, |c| sqlx::query(SQL)
        .bind(api_key_id)
        .bind(key_hash)
        .bind(owner)
        .bind(response)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// Drops the claim `owner` holds (the request did not finish with an answer worth replaying).
pub async fn release(c: &mut Conn<'_>, api_key_id: Uuid, key_hash: &[u8], owner: Uuid) -> Result<bool> {
    const SQL: &str = "DELETE FROM idempotency_keys \
                       WHERE api_key_id = $1 AND key_hash = $2 AND owner = $3 AND state = 'running'";
    let n = dispatch!(c, |c| sqlx::query(SQL)
        .bind(api_key_id)
        .bind(key_hash)
        .bind(owner)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// Deletes up to `limit` records expired at `now` (the sweeper's bounded batch).
pub async fn purge_expired(c: &mut Conn<'_>, now: DateTime<Utc>, limit: i64) -> Result<u64> {
    const SQL: &str = "DELETE FROM idempotency_keys WHERE (api_key_id, key_hash) IN \
                         (SELECT api_key_id, key_hash FROM idempotency_keys WHERE expires_at <= $1 LIMIT $2)";
    Ok(dispatch!(c, |c| sqlx::query(SQL).bind(now).bind(limit).execute(c).await.map(|r| r.rows_affected()))?)
}
