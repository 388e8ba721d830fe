//! `token_leases`: grant, renew, release and expire are single conditional statements.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Conn, Result};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LeaseRow {
    pub user_id: String,
    pub fence: i64,
    pub lease_id: Option<Uuid>,
    pub holder: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub granted_at: Option<DateTime<Utc>>,
}

macro_rules! cols {
    () => {
        "user_id, fence, lease_id, holder, expires_at, granted_at"
    };
}

/// Grants a new lease (fence + 1) unless a live one exists. `None` when one is live.
pub async fn grant(
    c: &mut Conn<'_>,
    user_id: &str,
    lease_id: Uuid,
    holder: &str,
    expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Option<LeaseRow>> {
    const SQL: &str = concat!(
        "INSERT INTO token_leases (user_id, fence, lease_id, holder, expires_at, granted_at) \
         VALUES ($1, 1, $2, $3, $4, $5) \
         ON CONFLICT (user_id) DO UPDATE SET fence = token_leases.fence + 1, lease_id = excluded.lease_id, \
           holder = excluded.holder, expires_at = excluded.expires_at, granted_at = excluded.granted_at \
         WHERE token_leases.expires_at IS NULL OR token_leases.expires_at <= $5 RETURNING ",
        cols!()
    );
    Ok(dispatch!(c, |c| sqlx::query_as(SQL)
        .bind(user_id)
        .bind(lease_id)
        .bind(holder)
        .bind(expires_at)
        .bind(now)
        .fetch_optional(c)
        .await)?)
}

/// Extends the live lease of `holder` (same fence); never shortens it (a renewal asking for less
/// than what is left keeps the later expiry). `None` when `holder` holds no live lease.
pub async fn renew(
    c: &mut Conn<'_>,
    user_id: &str,
    holder: &str,
    expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Option<LeaseRow>> {
    const SQL: &str = concat!(
        "UPDATE token_leases SET expires_at = CASE WHEN expires_at > $3 THEN expires_at ELSE $3 END \
         WHERE user_id = $1 AND holder = $2 AND expires_at > $4 RETURNING ",
        cols!()
    );
    Ok(dispatch!(c, |c| sqlx::query_as(SQL)
        .bind(user_id)
        .bind(holder)
        .bind(expires_at)
        .bind(now)
        .fetch_optional(c)
        .await)?)
}

/// The live lease of a user, if any.
pub async fn live(c: &mut Conn<'_>, user_id: &str, now: DateTime<Utc>) -> Result<Option<LeaseRow>> {
    const SQL: &str = concat!("SELECT ", cols!(), " FROM token_leases WHERE user_id = $1 AND expires_at > $2");
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(user_id).bind(now).fetch_optional(c).await)?)
}

/// Ends the lease with this fence if it is the user's live lease. `None` when it is not
/// (expired, released, or superseded by a newer fence).
pub async fn release(c: &mut Conn<'_>, user_id: &str, fence: i64, now: DateTime<Utc>) -> Result<Option<LeaseRow>> {
    const SQL: &str = concat!(
        "UPDATE token_leases SET lease_id = NULL, holder = NULL, expires_at = NULL \
         WHERE user_id = $1 AND fence = $2 AND expires_at > $3 RETURNING ",
        cols!()
    );
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(user_id).bind(fence).bind(now).fetch_optional(c).await)?)
}

/// Users whose lease has lapsed but is not yet marked so (the sweeper's work list).
pub async fn due_for_expiry(c: &mut Conn<'_>, now: DateTime<Utc>, limit: i64) -> Result<Vec<LeaseRow>> {
    const SQL: &str = concat!(
        "SELECT ",
        cols!(),
        " FROM token_leases WHERE expires_at IS NOT NULL AND expires_at <= $1 ORDER BY user_id LIMIT $2"
    );
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(now).bind(limit).fetch_all(c).await)?)
}

/// Marks one lapsed lease as ended (conditional on the same fence still lapsing).
pub async fn expire(c: &mut Conn<'_>, user_id: &str, fence: i64, now: DateTime<Utc>) -> Result<bool> {
    const SQL: &str = "UPDATE token_leases SET lease_id = NULL, holder = NULL, expires_at = NULL \
                       WHERE user_id = $1 AND fence = $2 AND expires_at IS NOT NULL AND expires_at <= $3";
    let n = dispatch!(c, |c| sqlx::query(SQL)
        .bind(user_id)
        .bind(fence)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n > 0)
}
