//! The expiry sweeper: a tokio task that, every `CENTRALDB_SWEEP_INTERVAL_SECS`,
//! - expires pending/verified challenges past their expiry (destroying their resume state) and
//!   moves their sessions to `expired`;
//! - expires active sessions past their expiry (cancelling their live challenges);
//! - destroys the ciphertext of token bundles past their refresh expiry (`token.expired`);
//! - ends refresh leases past their expiry (`lease.expired`; the fence is kept);
//! - deletes terminal challenges and sessions older than the retention period, and failure
//!   records older than the failure window;
//! - purges audit events older than `CENTRALDB_AUDIT_RETENTION_DAYS` (`audit::purge_before`:
//!   a checked prefix of the chain, the head's anchor moved, `audit verify` still works).
//! - deletes `Idempotency-Key` records past `CENTRALDB_IDEMPOTENCY_TTL_SECS` (bounded per pass).
//!
//! Every `CENTRALDB_AUDIT_CHECKPOINT_INTERVAL_SECS` (0: never) it logs a signed audit checkpoint
//! (`audit::checkpoint`, target `centraldb_mfa::audit_checkpoint`), so that log shipping keeps
//! witnesses of the chains' heads outside the database.
//!
//! Between passes it also writes the refusal summaries whose window has ended (every few
//! seconds), and all of them when it stops (graceful shutdown).
//!
//! The expiries are the services' own operations (`Mfa::expire_due`, `Sessions::expire_due`,
//! `Vault::expire_due`, `Leases::expire_due`, which own the rule and its audit event); the
//! sweeper only schedules them, as it does the purges (`retention::purge`,
//! `idempotency::purge_expired`, `audit::purge_before`). Each expiry is a conditional statement audited in its own
//! transaction, holding the lock of the user it is about (`Db::begin_write_for`, as that user's own writers do), so several
//! instances can sweep at once without double audit rows, and a user's request and the sweeper
//! take turns without holding up other users. The retention and idempotency purges keep the
//! common lock (`Db::begin_write`): they touch only rows no per-user writer waits for. Reads
//! never depend on it: an expired challenge or session reads `expired` before the sweeper gets
//! to it.

use chrono::{DateTime, Utc};

use crate::{
    services::{
        audit::{self, AuditContext},
        idempotency, retention,
    },
    state::AppState,
    store::{self, StoreError},
};

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub challenges_expired: u64,
    pub sessions_expired: u64,
    pub tokens_expired: u64,
    pub leases_expired: u64,
    pub purged: u64,
    pub audit_purged: u64,
}

const BATCH: i64 = 200;

/// Runs passes until `shutdown` resolves.
pub async fn run(state: AppState, shutdown: impl std::future::Future<Output = ()>) {
    let mut tick = tokio::time::interval(state.settings.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refusal_tick = tokio::time::interval(refusal_flush_period(&state));
    refusal_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let checkpoint_every = state.settings.audit_checkpoint_interval;
    let mut checkpoint_tick = tokio::time::interval(checkpoint_every.unwrap_or(std::time::Duration::from_secs(86_400)));
    checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = checkpoint_tick.tick(), if checkpoint_every.is_some() => log_checkpoint(&state).await,
            _ = refusal_tick.tick() => {
                if let Err(e) = flush_refusals(&state, store::now(), false).await {
                    tracing::warn!(error = %e, "could not write refusal summaries; retrying");
                }
            }
            _ = tick.tick() => {
                let result = sweep_once(&state, store::now()).await;
                record_pass(&result);
                match result {
                    Ok(r) if r != SweepReport::default() => tracing::info!(?r, "sweep pass"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "sweep pass failed; retrying next interval"),
                }
            }
        }
    }
    if let Err(e) = flush_refusals(&state, store::now(), true).await {
        tracing::warn!(error = %e, "could not write refusal summaries at shutdown");
    }
    tracing::info!("sweeper stopped");
}

/// Logs a signed checkpoint of every audit chain's head (one JSON line, for log shipping).
pub async fn log_checkpoint(state: &AppState) {
    match audit::checkpoint(&state.db, &state.keyring).await {
        Ok(cp) => match serde_json::to_string(&cp) {
            Ok(json) => {
                tracing::info!(target: "centraldb_mfa::audit_checkpoint", checkpoint = %json, "audit checkpoint")
            }
            Err(e) => tracing::warn!(error = %e, "could not encode the audit checkpoint"),
        },
        Err(e) => tracing::warn!(error = %e, "could not take an audit checkpoint; retrying next interval"),
    }
}

/// How often ended refusal windows are written: a quarter of the window, 1 to 5 s.
/// The sweeper's metrics for one pass: runs by outcome, items by kind, last success time.
fn record_pass(result: &Result<SweepReport, StoreError>) {
    use crate::telemetry::{SWEEPER_ITEMS, SWEEPER_LAST_SUCCESS, SWEEPER_RUNS};
    let Ok(r) = result else {
        metrics::counter!(SWEEPER_RUNS, "outcome" => "error").increment(1);
        return;
    };
    metrics::counter!(SWEEPER_RUNS, "outcome" => "ok").increment(1);
    for (kind, n) in [
        ("challenges_expired", r.challenges_expired),
        ("sessions_expired", r.sessions_expired),
        ("tokens_expired", r.tokens_expired),
        ("leases_expired", r.leases_expired),
        ("purged", r.purged),
        ("audit_purged", r.audit_purged),
    ] {
        metrics::counter!(SWEEPER_ITEMS, "kind" => kind).increment(n);
    }
    metrics::gauge!(SWEEPER_LAST_SUCCESS).set(store::now().timestamp_micros() as f64 / 1e6);
}

fn refusal_flush_period(state: &AppState) -> std::time::Duration {
    (state.settings.refusals.interval / 4).clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(5))
}

/// Writes the refusal summaries due at `now` (`all`: every open window too, as at shutdown).
/// Returns how many events were written.
pub async fn flush_refusals(state: &AppState, now: DateTime<Utc>, all: bool) -> Result<usize, StoreError> {
    state.refusals.flush(&state.db, &state.keyring, now, all).await
}

/// Deletes `Idempotency-Key` records past their TTL (`idempotency::purge_expired`: bounded per
/// pass, each batch its own short transaction, nothing audited).
async fn purge_idempotency_keys(state: &AppState, now: DateTime<Utc>) -> Result<u64, StoreError> {
    let total = idempotency::purge_expired(&state.db, now).await?;
    if total > 0 {
        tracing::info!(purged = total, "expired Idempotency-Key records deleted");
    }
    Ok(total)
}

/// One pass over everything due at `now`.
pub async fn sweep_once(state: &AppState, now: DateTime<Utc>) -> Result<SweepReport, StoreError> {
    let ctx = AuditContext::system("sweeper");
    let keyring = &state.keyring;
    let mut report = SweepReport::default();

    // Each expiry is owned by the service whose rule it is (conditional statement, audit event,
    // the user's lock, one transaction per item); the sweeper only schedules them.
    let expired = state.mfa.expire_due(&ctx, now, BATCH).await?;
    report.challenges_expired = expired.challenges;
    report.sessions_expired = expired.sessions;
    report.sessions_expired += state.sessions.expire_due(&ctx, now, BATCH).await?;
    report.tokens_expired = state.vault.expire_due(&ctx, now, BATCH).await?;
    report.leases_expired = state.leases.expire_due(&ctx, now, BATCH).await?;

    purge_idempotency_keys(state, now).await?;

    let kept_for = chrono::Duration::from_std(state.settings.retention).unwrap_or(chrono::Duration::days(7));
    let window = chrono::Duration::from_std(state.settings.mfa.failure_window).unwrap_or(chrono::Duration::days(1));
    report.purged = retention::purge(&state.db, keyring, &ctx, now - kept_for, now - window).await?;

    if let Some(keep) = state.settings.audit_retention {
        let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::days(365));
        report.audit_purged = audit::purge_before(&state.db, keyring, now - keep).await?.events;
    }
    Ok(report)
}
