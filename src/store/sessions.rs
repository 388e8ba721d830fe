//! `sessions`: one row per login flow. State changes are conditional on the current state.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Conn, Result};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    pub id: Uuid,
    pub user_id: String,
    pub state: String,
    pub challenge_id: Option<Uuid>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

macro_rules! cols {
    () => {
        "id, user_id, state, challenge_id, client_ip, user_agent, reason, created_at, updated_at, expires_at"
    };
}
macro_rules! active {
    () => {
        "('started', 'mfa_required', 'mfa_verified')"
    };
}

pub async fn insert(c: &mut Conn<'_>, s: &SessionRow) -> Result<()> {
    const SQL: &str = concat!("INSERT INTO sessions (", cols!(), ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)");
    dispatch!(c, |c| sqlx::query(SQL)
        .bind(s.id)
        .bind(&s.user_id)
        .bind(&s.state)
        .bind(s.challenge_id)
        .bind(&s.client_ip)
        .bind(&s.user_agent)
        .bind(&s.reason)
        .bind(s.created_at)
        .bind(s.updated_at)
        .bind(s.expires_at)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}

pub async fn get(c: &mut Conn<'_>, id: Uuid) -> Result<Option<SessionRow>> {
    const SQL: &str = concat!("SELECT ", cols!(), " FROM sessions WHERE id = $1");
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(id).fetch_optional(c).await)?)
}

/// A user's sessions that are neither terminal nor past their expiry, newest first.
pub async fn list_active(c: &mut Conn<'_>, user_id: &str, now: DateTime<Utc>) -> Result<Vec<SessionRow>> {
    const SQL: &str = concat!(
        "SELECT ",
        cols!(),
        " FROM sessions WHERE user_id = $1 AND state IN ",
        active!(),
        " AND expires_at > $2 ORDER BY created_at DESC, id DESC"
    );
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(user_id).bind(now).fetch_all(c).await)?)
}

/// A user's sessions in an active state, whatever their expiry (for supersession and logout).
pub async fn list_unended(c: &mut Conn<'_>, user_id: &str) -> Result<Vec<SessionRow>> {
    const SQL: &str = concat!("SELECT ", cols!(), " FROM sessions WHERE user_id = $1 AND state IN ", active!());
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(user_id).fetch_all(c).await)?)
}

/// Moves a session from exactly `from` to `to`; `None` when its state was not `from`.
pub async fn transition(
    c: &mut Conn<'_>,
    id: Uuid,
    from: &str,
    to: &str,
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Option<SessionRow>> {
    const SQL: &str = concat!(
        "UPDATE sessions SET state = $3, reason = $4, updated_at = $5 \
         WHERE id = $1 AND state = $2 RETURNING ",
        cols!()
    );
    Ok(dispatch!(c, |c| sqlx::query_as(SQL)
        .bind(id)
        .bind(from)
        .bind(to)
        .bind(reason)
        .bind(now)
        .fetch_optional(c)
        .await)?)
}

pub async fn set_challenge(c: &mut Conn<'_>, id: Uuid, challenge_id: Uuid, now: DateTime<Utc>) -> Result<()> {
    dispatch!(c, |c| sqlx::query("UPDATE sessions SET challenge_id = $2, updated_at = $3 WHERE id = $1")
        .bind(id)
        .bind(challenge_id)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Active sessions past their expiry, at most `limit` (the sweeper's work list).
pub async fn due_for_expiry(c: &mut Conn<'_>, now: DateTime<Utc>, limit: i64) -> Result<Vec<SessionRow>> {
    const SQL: &str = concat!(
        "SELECT ",
        cols!(),
        " FROM sessions WHERE state IN ",
        active!(),
        " AND expires_at <= $1 ORDER BY id LIMIT $2"
    );
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(now).bind(limit).fetch_all(c).await)?)
}

/// Deletes terminal sessions last changed before `before`; returns how many.
pub async fn purge_terminal(c: &mut Conn<'_>, before: DateTime<Utc>) -> Result<u64> {
    const SQL: &str = concat!("DELETE FROM sessions WHERE state NOT IN ", active!(), " AND updated_at < $1");
    Ok(dispatch!(c, |c| sqlx::query(SQL).bind(before).execute(c).await.map(|r| r.rows_affected()))?)
}
