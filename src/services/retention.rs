//! Retention: terminal challenges and sessions older than the retention period, and MFA failure
//! records older than the failure window, are deleted in one transaction under the common write
//! lock (`Db::begin_write`: no per-user writer waits for these rows), with one
//! `retention.purged` audit event when a challenge or session went. The sweeper schedules it.

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::{
    crypto::Keyring,
    services::audit::{self, AuditContext, Outcome},
    store::{self, Db},
};

/// Deletes terminal challenges and sessions that ended before `older_than` and failure records
/// from before `failures_before`, auditing the purge in the same transaction. Returns how many
/// rows went (challenges, sessions and failure records together).
pub async fn purge(
    db: &Db,
    keyring: &Keyring,
    ctx: &AuditContext,
    older_than: DateTime<Utc>,
    failures_before: DateTime<Utc>,
) -> store::Result<u64> {
    let mut tx = db.begin_write().await?;
    let mut c = tx.conn();
    let challenges = store::challenges::purge_terminal(&mut c, older_than).await?;
    let sessions = store::sessions::purge_terminal(&mut c, older_than).await?;
    let failures = store::challenges::purge_failures(&mut c, failures_before).await?;
    if challenges + sessions > 0 {
        audit::record(
            &mut c,
            keyring,
            ctx,
            "retention.purged",
            Outcome::Success,
            None,
            json!({"challenges": challenges, "sessions": sessions, "failure_records": failures,
                   "older_than": older_than.to_rfc3339()}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(challenges + sessions + failures)
}
