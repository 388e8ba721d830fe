//! `challenges`, `challenge_attempts`, `mfa_failures`. Attempts, verification, consumption and
//! expiry are single conditional statements, so concurrent requests (from any number of
//! processes) can never take more attempts than allowed or succeed twice.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Conn, Result};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChallengeRow {
    pub id: Uuid,
    pub user_id: String,
    pub session_id: Option<Uuid>,
    pub method: String,
    pub verifier: String,
    pub destination: Option<String>,
    pub status: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub code_hash: Option<String>,
    pub resume_state: Option<Vec<u8>>,
    pub resume_key_id: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub verified_at: Option<DateTime<Utc>>,
    pub consumed_at: Option<DateTime<Utc>>,
}

macro_rules! cols {
    () => {
        "id, user_id, session_id, method, verifier, destination, status, attempts, max_attempts, code_hash, \
         resume_state, resume_key_id, expires_at, created_at, updated_at, verified_at, consumed_at"
    };
}
/// Terminal moves also destroy the resume state.
macro_rules! destroy_resume {
    () => {
        "resume_state = NULL, resume_key_id = NULL"
    };
}

pub async fn insert(c: &mut Conn<'_>, r: &ChallengeRow) -> Result<()> {
    const SQL: &str = concat!(
        "INSERT INTO challenges (",
        cols!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    );
    dispatch!(c, |c| sqlx::query(SQL)
        .bind(r.id)
        .bind(&r.user_id)
        .bind(r.session_id)
        .bind(&r.method)
        .bind(&r.verifier)
        .bind(&r.destination)
        .bind(&r.status)
        .bind(r.attempts)
        .bind(r.max_attempts)
        .bind(&r.code_hash)
        .bind(&r.resume_state)
        .bind(&r.resume_key_id)
        .bind(r.expires_at)
        .bind(r.created_at)
        .bind(r.updated_at)
        .bind(r.verified_at)
        .bind(r.consumed_at)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}

pub async fn get(c: &mut Conn<'_>, id: Uuid) -> Result<Option<ChallengeRow>> {
    const SQL: &str = concat!("SELECT ", cols!(), " FROM challenges WHERE id = $1");
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(id).fetch_optional(c).await)?)
}

/// Live pending challenges of a user: how many, and when the first of them expires.
pub async fn pending_for_user(c: &mut Conn<'_>, user_id: &str, now: DateTime<Utc>) -> Result<Vec<ChallengeRow>> {
    const SQL: &str = concat!(
        "SELECT ",
        cols!(),
        " FROM challenges WHERE user_id = $1 AND status = 'pending' AND expires_at > $2 ORDER BY expires_at"
    );
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(user_id).bind(now).fetch_all(c).await)?)
}

/// Challenges with status `pending`, expired or not: the sum of the 16 rows the triggers of
/// migration 0009 keep, so its cost does not grow with the table. An upper bound on the live ones.
pub async fn pending_upper_bound(c: &mut Conn<'_>) -> Result<i64> {
    const SQL: &str = "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM challenge_pending_counts";
    Ok(dispatch!(c, |c| sqlx::query_scalar(SQL).fetch_one(c).await)?)
}

/// Live pending challenges service-wide, counted exactly but never past `limit`.
pub async fn count_pending_global_upto(c: &mut Conn<'_>, now: DateTime<Utc>, limit: i64) -> Result<i64> {
    const SQL: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM challenges \
                       WHERE status = 'pending' AND expires_at > $1 LIMIT $2) AS live";
    Ok(dispatch!(c, |c| sqlx::query_scalar(SQL).bind(now).bind(limit).fetch_one(c).await)?)
}

/// Challenges of a user (or of a session) that are pending or verified.
pub async fn live_for_user(c: &mut Conn<'_>, user_id: &str) -> Result<Vec<ChallengeRow>> {
    const SQL: &str =
        concat!("SELECT ", cols!(), " FROM challenges WHERE user_id = $1 AND status IN ('pending', 'verified')");
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(user_id).fetch_all(c).await)?)
}

pub async fn live_for_session(c: &mut Conn<'_>, session_id: Uuid) -> Result<Vec<ChallengeRow>> {
    const SQL: &str =
        concat!("SELECT ", cols!(), " FROM challenges WHERE session_id = $1 AND status IN ('pending', 'verified')");
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(session_id).fetch_all(c).await)?)
}

/// Moves a challenge from one of `from` (a SQL list literal) to a terminal `to`, destroying the
/// resume state. `None` when it was in no such state.
async fn end(c: &mut Conn<'_>, sql: &'static str, id: Uuid, now: DateTime<Utc>) -> Result<Option<ChallengeRow>> {
    Ok(dispatch!(c, |c| sqlx::query_as(sql).bind(id).bind(now).fetch_optional(c).await)?)
}

pub async fn cancel(c: &mut Conn<'_>, id: Uuid, now: DateTime<Utc>) -> Result<Option<ChallengeRow>> {
    const SQL: &str = concat!(
        "UPDATE challenges SET status = 'cancelled', ",
        destroy_resume!(),
        ", updated_at = $2 WHERE id = $1 AND status IN ('pending', 'verified') RETURNING ",
        cols!()
    );
    end(c, SQL, id, now).await
}

pub async fn mark_failed(c: &mut Conn<'_>, id: Uuid, now: DateTime<Utc>) -> Result<Option<ChallengeRow>> {
    const SQL: &str = concat!(
        "UPDATE challenges SET status = 'failed', ",
        destroy_resume!(),
        ", updated_at = $2 WHERE id = $1 AND status = 'pending' RETURNING ",
        cols!()
    );
    end(c, SQL, id, now).await
}

/// How long past its expiry a challenge waits for Garmin's answer to an attempt reserved in time.
pub const LATE_RESULT_GRACE_SECS: i64 = 120;

/// A challenge with an attempt reserved less than the grace period ago and not yet answered.
macro_rules! awaiting_result {
    () => {
        "EXISTS (SELECT 1 FROM challenge_attempts a WHERE a.challenge_id = challenges.id \
         AND a.result IS NULL AND a.created_at > $3)"
    };
}

/// Expires one live challenge that is past its expiry (the sweeper's move), unless Garmin's
/// answer to a recent attempt is still awaited.
pub async fn expire(c: &mut Conn<'_>, id: Uuid, now: DateTime<Utc>) -> Result<Option<ChallengeRow>> {
    const SQL: &str = concat!(
        "UPDATE challenges SET status = 'expired', ",
        destroy_resume!(),
        ", updated_at = $2 WHERE id = $1 AND status IN ('pending', 'verified') AND expires_at <= $2 AND NOT ",
        awaiting_result!(),
        " RETURNING ",
        cols!()
    );
    let grace = now - chrono::Duration::seconds(LATE_RESULT_GRACE_SECS);
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(id).bind(now).bind(grace).fetch_optional(c).await)?)
}

/// `verified` → `consumed`, exactly once, before the consume deadline.
pub async fn consume(c: &mut Conn<'_>, id: Uuid, now: DateTime<Utc>) -> Result<Option<ChallengeRow>> {
    const SQL: &str = concat!(
        "UPDATE challenges SET status = 'consumed', consumed_at = $2, ",
        destroy_resume!(),
        ", updated_at = $2 WHERE id = $1 AND status = 'verified' AND expires_at > $2 RETURNING ",
        cols!()
    );
    end(c, SQL, id, now).await
}

/// Takes one attempt if the challenge is pending, unexpired, of this verifier and has attempts
/// left. The returned row carries the new attempt count.
pub async fn reserve_attempt(
    c: &mut Conn<'_>,
    id: Uuid,
    verifier: &str,
    now: DateTime<Utc>,
) -> Result<Option<ChallengeRow>> {
    const SQL: &str = concat!(
        "UPDATE challenges SET attempts = attempts + 1, updated_at = $2 \
         WHERE id = $1 AND verifier = $3 AND status = 'pending' AND expires_at > $2 AND attempts < max_attempts \
         RETURNING ",
        cols!()
    );
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(id).bind(now).bind(verifier).fetch_optional(c).await)?)
}

/// `pending` → `verified`; the challenge then stays consumable until `consume_by`.
pub async fn mark_verified(
    c: &mut Conn<'_>,
    id: Uuid,
    now: DateTime<Utc>,
    consume_by: DateTime<Utc>,
) -> Result<Option<ChallengeRow>> {
    const SQL: &str = concat!(
        "UPDATE challenges SET status = 'verified', verified_at = $2, expires_at = $3, updated_at = $2 \
         WHERE id = $1 AND status = 'pending' RETURNING ",
        cols!()
    );
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(id).bind(now).bind(consume_by).fetch_optional(c).await)?)
}

/// Live challenges past their expiry, at most `limit` (the sweeper's work list).
pub async fn due_for_expiry(c: &mut Conn<'_>, now: DateTime<Utc>, limit: i64) -> Result<Vec<Uuid>> {
    const SQL: &str = concat!(
        "SELECT id FROM challenges WHERE status IN ('pending', 'verified') AND expires_at <= $1 AND NOT ",
        awaiting_result!(),
        " ORDER BY id LIMIT $2"
    );
    let grace = now - chrono::Duration::seconds(LATE_RESULT_GRACE_SECS);
    Ok(dispatch!(c, |c| sqlx::query_scalar(SQL).bind(now).bind(limit).bind(grace).fetch_all(c).await)?)
}

/// Deletes terminal challenges (and their attempts) last changed before `before`.
pub async fn purge_terminal(c: &mut Conn<'_>, before: DateTime<Utc>) -> Result<u64> {
    const ATTEMPTS: &str = "DELETE FROM challenge_attempts WHERE challenge_id IN (SELECT id FROM challenges \
                            WHERE status NOT IN ('pending', 'verified') AND updated_at < $1)";
    const SQL: &str = "DELETE FROM challenges WHERE status NOT IN ('pending', 'verified') AND updated_at < $1";
    dispatch!(c, |c| sqlx::query(ATTEMPTS).bind(before).execute(c).await.map(|r| r.rows_affected()))?;
    Ok(dispatch!(c, |c| sqlx::query(SQL).bind(before).execute(c).await.map(|r| r.rows_affected()))?)
}

// ---- attempts at externally verified challenges -------------------------------------------

pub async fn code_tried(c: &mut Conn<'_>, id: Uuid, code_mac: &[u8]) -> Result<bool> {
    const SQL: &str = "SELECT COUNT(*) FROM challenge_attempts WHERE challenge_id = $1 AND code_mac = $2";
    let n: i64 = dispatch!(c, |c| sqlx::query_scalar(SQL).bind(id).bind(code_mac).fetch_one(c).await)?;
    Ok(n > 0)
}

pub async fn insert_attempt(c: &mut Conn<'_>, id: Uuid, n: i64, code_mac: &[u8], now: DateTime<Utc>) -> Result<()> {
    const SQL: &str =
        "INSERT INTO challenge_attempts (challenge_id, n, code_mac, result, created_at) VALUES ($1, $2, $3, NULL, $4)";
    dispatch!(c, |c| sqlx::query(SQL)
        .bind(id)
        .bind(n)
        .bind(code_mac)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Records Garmin's answer for attempt `n`, once. `Err`-free `None` when there is no such
/// unresolved attempt.
pub async fn resolve_attempt(c: &mut Conn<'_>, id: Uuid, n: i64, result: &str, now: DateTime<Utc>) -> Result<bool> {
    const SQL: &str = "UPDATE challenge_attempts SET result = $3, resolved_at = $4 \
                       WHERE challenge_id = $1 AND n = $2 AND result IS NULL";
    let rows = dispatch!(c, |c| sqlx::query(SQL)
        .bind(id)
        .bind(n)
        .bind(result)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(rows > 0)
}

/// The recorded result of attempt `n`: `None` if there is no such attempt, `Some(None)` while
/// unresolved.
pub async fn attempt_result(c: &mut Conn<'_>, id: Uuid, n: i64) -> Result<Option<Option<String>>> {
    const SQL: &str = "SELECT result FROM challenge_attempts WHERE challenge_id = $1 AND n = $2";
    Ok(dispatch!(c, |c| sqlx::query_scalar(SQL).bind(id).bind(n).fetch_optional(c).await)?)
}

/// Attempts not yet known to have failed (unresolved or successful).
pub async fn open_attempts(c: &mut Conn<'_>, id: Uuid) -> Result<i64> {
    const SQL: &str =
        "SELECT COUNT(*) FROM challenge_attempts WHERE challenge_id = $1 AND (result IS NULL OR result <> 'failure')";
    Ok(dispatch!(c, |c| sqlx::query_scalar(SQL).bind(id).fetch_one(c).await)?)
}

// ---- the per-user failure budget -----------------------------------------------------------

pub async fn record_failure(c: &mut Conn<'_>, user_id: &str, challenge_id: Uuid, now: DateTime<Utc>) -> Result<()> {
    const SQL: &str = "INSERT INTO mfa_failures (user_id, challenge_id, at) VALUES ($1, $2, $3)";
    dispatch!(c, |c| sqlx::query(SQL)
        .bind(user_id)
        .bind(challenge_id)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Failures of a user since `since`: how many, and the oldest of them.
pub async fn failures_since(
    c: &mut Conn<'_>,
    user_id: &str,
    since: DateTime<Utc>,
) -> Result<(i64, Option<DateTime<Utc>>)> {
    const SQL: &str = "SELECT COUNT(*), MIN(at) FROM mfa_failures WHERE user_id = $1 AND at > $2";
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(user_id).bind(since).fetch_one(c).await)?)
}

pub async fn purge_failures(c: &mut Conn<'_>, before: DateTime<Utc>) -> Result<u64> {
    const SQL: &str = "DELETE FROM mfa_failures WHERE at <= $1";
    Ok(dispatch!(c, |c| sqlx::query(SQL).bind(before).execute(c).await.map(|r| r.rows_affected()))?)
}

// ---- key rotation --------------------------------------------------------------------------

/// Key ids that some stored resume state is encrypted under.
pub async fn resume_key_ids(c: &mut Conn<'_>) -> Result<Vec<String>> {
    const SQL: &str = "SELECT DISTINCT resume_key_id FROM challenges WHERE resume_key_id IS NOT NULL";
    Ok(dispatch!(c, |c| sqlx::query_scalar(SQL).fetch_all(c).await)?)
}

/// A page of resume states not under `active_key_id`, in id order after `after`.
pub async fn rewrap_page(
    c: &mut Conn<'_>,
    active_key_id: &str,
    after: Uuid,
    limit: i64,
) -> Result<Vec<(Uuid, Vec<u8>)>> {
    const SQL: &str = "SELECT id, resume_state FROM challenges WHERE resume_state IS NOT NULL \
                       AND resume_key_id <> $1 AND id > $2 ORDER BY id LIMIT $3";
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(active_key_id).bind(after).bind(limit).fetch_all(c).await)?)
}

/// Replaces one resume state if it is still the one read (compare-and-set).
pub async fn rewrap_one(c: &mut Conn<'_>, id: Uuid, old: &[u8], key_id: &str, new: &[u8]) -> Result<bool> {
    const SQL: &str = "UPDATE challenges SET resume_state = $3, resume_key_id = $4 WHERE id = $1 AND resume_state = $2";
    let n = dispatch!(c, |c| sqlx::query(SQL)
        .bind(id)
        .bind(old)
        .bind(new)
        .bind(key_id)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n > 0)
}
