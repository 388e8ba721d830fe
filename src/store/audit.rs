//! `audit_events`: append-only; written inside the transaction of the act it records.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Conn, Result};

/// One audit event as stored. `details` is JSON text and never holds a secret.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub seq: i64,
    pub id: Uuid,
    pub at: DateTime<Utc>,
    #[sqlx(rename = "type")]
    pub type_: String,
    pub outcome: String,
    pub user_id: Option<String>,
    pub actor: Option<String>,
    pub request_id: Option<String>,
    pub source_ip: Option<String>,
    pub details: String,
}

pub struct NewAuditEvent<'a> {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub type_: &'a str,
    pub outcome: &'a str,
    pub user_id: Option<&'a str>,
    pub actor: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub source_ip: Option<&'a str>,
    pub details: &'a str,
}

pub async fn insert(c: &mut Conn<'_>, e: &NewAuditEvent<'_>) -> Result<i64> {
    let sql = "INSERT INTO audit_events (id, at, type, outcome, user_id, actor, request_id, source_ip, details) \
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING seq";
    Ok(dispatch!(c, |c| sqlx::query_scalar(sql)
        .bind(e.id)
        .bind(e.at)
        .bind(e.type_)
        .bind(e.outcome)
        .bind(e.user_id)
        .bind(e.actor)
        .bind(e.request_id)
        .bind(e.source_ip)
        .bind(e.details)
        .fetch_one(c)
        .await)?)
}

/// Events in `seq` order after `after_seq` (for tests and, later, the events API).
pub async fn list_after(c: &mut Conn<'_>, after_seq: i64, limit: i64) -> Result<Vec<AuditRow>> {
    let sql = "SELECT seq, id, at, type, outcome, user_id, actor, request_id, source_ip, details \
               FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2";
    Ok(dispatch!(c, |c| sqlx::query_as(sql).bind(after_seq).bind(limit).fetch_all(c).await)?)
}
