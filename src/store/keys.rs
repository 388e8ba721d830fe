//! `key_checks`: a known plaintext per key id, to catch a wrong key before anything is written.

use chrono::{DateTime, Utc};

use super::{Conn, Result};

pub async fn all(c: &mut Conn<'_>) -> Result<Vec<(String, Vec<u8>)>> {
    Ok(dispatch!(c, |c| sqlx::query_as("SELECT key_id, envelope FROM key_checks ORDER BY key_id").fetch_all(c).await)?)
}

/// Stored token bundles per key id (bundles whose ciphertext was destroyed have none).
pub async fn bundles_per_key(c: &mut Conn<'_>) -> Result<Vec<(String, i64)>> {
    Ok(dispatch!(c, |c| sqlx::query_as(
        "SELECT key_id, COUNT(*) FROM token_bundles WHERE key_id IS NOT NULL GROUP BY key_id ORDER BY key_id"
    )
    .fetch_all(c)
    .await)?)
}

pub async fn insert_if_missing(c: &mut Conn<'_>, key_id: &str, envelope: &[u8], now: DateTime<Utc>) -> Result<()> {
    dispatch!(c, |c| {
        sqlx::query(
            "INSERT INTO key_checks (key_id, envelope, created_at) VALUES ($1, $2, $3) ON CONFLICT (key_id) DO NOTHING",
        )
        .bind(key_id)
        .bind(envelope)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(())
}
