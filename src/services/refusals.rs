//! Refused requests (401/403) per source address: recorded at once up to a few per interval,
//! then summed in memory into one audit event per source and interval; past a budget, answered
//! 429 without touching the database.
//!
//! A flood of bad keys from one address used to cost one durable write per request. Here each
//! source (the peer IP) has a window of `CENTRALDB_REFUSAL_INTERVAL_SECS` starting at its first
//! refusal. In a window:
//! - the first `CENTRALDB_REFUSAL_AUDIT_INDIVIDUAL` refusals are audited one by one
//!   (`auth.denied`, each with its request id) as before;
//! - later refusals are only counted (per reason), with the first and last time;
//! - past `CENTRALDB_REFUSAL_BUDGET` refusals, the source is answered 429 `too_many_requests`
//!   with `Retry-After` (the end of its window), and those are counted too.
//!
//! When the window ends, the counts become one `auth.refusals` event (outcome `denied`) for the
//! source, written by the sweeper's flush (every few seconds), at graceful shutdown, or when the
//! source refuses again after its window. The table is bounded: at
//! `CENTRALDB_REFUSAL_MAX_SOURCES` entries, the oldest windows are closed early (their summaries
//! queued for the flush) before a new source is added; the queue of summaries is bounded too
//! (past it, summaries are merged into one event without a source address).

use std::{collections::HashMap, net::IpAddr, sync::Mutex};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use crate::{
    crypto::Keyring,
    services::audit::{self, AuditContext, Outcome, PendingEvent},
    store::{self, Db},
};

use crate::config::RefusalLimits;

/// Audits one refused request (`auth.denied`, outcome `denied`) in a write transaction of its own.
pub async fn record_denial(db: &Db, keyring: &Keyring, ctx: &AuditContext, details: Value) -> store::Result<()> {
    let mut tx = db.begin_write().await?;
    audit::record(&mut tx.conn(), keyring, ctx, "auth.denied", Outcome::Denied, None, details).await?;
    tx.commit().await
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Audit it now, on its own (`auth.denied`).
    Record,
    /// Counted into the source's summary: no write now.
    Summed,
    /// Over budget: answer 429 with this `Retry-After` (seconds), no write.
    Throttled { retry_after: u64 },
}

/// The counts of one source's window beyond the individually audited refusals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `None` for the merged overflow summary (and requests without a peer address).
    pub source: Option<String>,
    pub window_start: DateTime<Utc>,
    /// Refusals audited one by one in the window.
    pub recorded: u64,
    /// Refusals summed here (answered 401/403 or 429).
    pub count: u64,
    /// Of `count`, those answered 429.
    pub throttled: u64,
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
    /// `count` by reason (`unknown_key`, `missing_key`, ..., `throttled` for 429s).
    pub reasons: HashMap<&'static str, u64>,
    /// Sources merged into this summary (1 unless it is the overflow summary).
    pub sources: u64,
}

#[derive(Debug)]
struct Entry {
    window_start: DateTime<Utc>,
    /// Refusals in this window (individual + summed + throttled).
    seen: u64,
    recorded: u64,
    summary: Option<Summary>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<Option<IpAddr>, Entry>,
    /// Closed windows' summaries waiting for the flush.
    pending: Vec<Summary>,
    /// Summaries merged after `pending` was full.
    overflow: Option<Summary>,
}

/// The per-source refusal table (one per process).
pub struct Refusals {
    limits: RefusalLimits,
    table: Mutex<Table>,
}

impl std::fmt::Debug for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refusals").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl Refusals {
    pub fn new(limits: RefusalLimits) -> Self {
        Self { limits, table: Mutex::new(Table::default()) }
    }

    pub fn limits(&self) -> RefusalLimits {
        self.limits
    }

    fn interval(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.limits.interval).unwrap_or(chrono::Duration::seconds(60))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seconds until the window of `source` ends, when the source is over its budget now (a
    /// cheap look-up the caller makes before authenticating: an over-budget source is answered
    /// 429 without a database query unless its key is a cached valid one).
    pub fn throttled(&self, source: Option<IpAddr>, now: DateTime<Utc>) -> Option<u64> {
        let t = self.lock();
        let e = t.entries.get(&source)?;
        let end = e.window_start + self.interval();
        (now < end && e.seen >= u64::from(self.limits.budget)).then(|| retry_after(end, now))
    }

    /// Counts one refusal of `reason` from `source` at `now` and says what to do with it.
    pub fn refuse(&self, source: Option<IpAddr>, reason: &'static str, now: DateTime<Utc>) -> Verdict {
        let interval = self.interval();
        let mut t = self.lock();
        let t = &mut *t;
        if let Some(e) = t.entries.get_mut(&source)
            && now >= e.window_start + interval
        {
            // The window is over: its summary goes to the flush, a new window starts.
            if let Some(s) = e.summary.take() {
                push_pending(&mut t.pending, &mut t.overflow, s, self.limits.max_sources);
            }
            *e = Entry { window_start: now, seen: 0, recorded: 0, summary: None };
        }
        if !t.entries.contains_key(&source) && t.entries.len() >= self.limits.max_sources {
            self.evict_oldest(t);
        }
        let e = t.entries.entry(source).or_insert(Entry { window_start: now, seen: 0, recorded: 0, summary: None });
        e.seen += 1;
        let end = e.window_start + interval;
        let verdict = if e.seen > u64::from(self.limits.budget) {
            Verdict::Throttled { retry_after: retry_after(end, now) }
        } else if e.recorded < u64::from(self.limits.individual) {
            e.recorded += 1;
            return Verdict::Record;
        } else {
            Verdict::Summed
        };
        let recorded = e.recorded;
        let s = e.summary.get_or_insert_with(|| Summary {
            source: source.map(|ip| ip.to_string()),
            window_start: e.window_start,
            recorded,
            count: 0,
            throttled: 0,
            first: now,
            last: now,
            reasons: HashMap::new(),
            sources: 1,
        });
        s.recorded = recorded;
        s.count += 1;
        s.last = s.last.max(now);
        let key = if matches!(verdict, Verdict::Throttled { .. }) {
            s.throttled += 1;
            "throttled"
        } else {
            reason
        };
        *s.reasons.entry(key).or_default() += 1;
        verdict
    }

    /// Closes the oldest tenth of the windows (at least one) so a new source fits: O(n) once per
    /// n/10 new sources.
    fn evict_oldest(&self, t: &mut Table) {
        let n = (t.entries.len() / 10).max(1);
        let mut by_age: Vec<(DateTime<Utc>, Option<IpAddr>)> =
            t.entries.iter().map(|(k, e)| (e.window_start, *k)).collect();
        if n < by_age.len() {
            by_age.select_nth_unstable(n - 1);
        }
        for (_, k) in by_age.into_iter().take(n) {
            if let Some(s) = t.entries.remove(&k).and_then(|e| e.summary) {
                push_pending(&mut t.pending, &mut t.overflow, s, self.limits.max_sources);
            }
        }
    }

    /// Takes the summaries due at `now` (windows ended; with `all`, every window, as at
    /// shutdown) and forgets ended windows.
    pub fn take_due(&self, now: DateTime<Utc>, all: bool) -> Vec<Summary> {
        let interval = self.interval();
        let mut t = self.lock();
        let t = &mut *t;
        let mut out = std::mem::take(&mut t.pending);
        t.entries.retain(|_, e| {
            let ended = now >= e.window_start + interval;
            if (ended || all)
                && let Some(s) = e.summary.take()
            {
                out.push(s);
            }
            !ended
        });
        out.extend(t.overflow.take());
        out
    }

    /// Puts summaries back (their write failed): they are written by a later flush.
    fn restore(&self, summaries: Vec<Summary>) {
        let mut t = self.lock();
        let t = &mut *t;
        for s in summaries {
            push_pending(&mut t.pending, &mut t.overflow, s, self.limits.max_sources);
        }
    }

    /// Writes the due summaries as `auth.refusals` events (one transaction, O(1) statements).
    /// Returns how many were written. On failure they are kept for the next flush.
    pub async fn flush(&self, db: &Db, keyring: &Keyring, now: DateTime<Utc>, all: bool) -> store::Result<usize> {
        let due = self.take_due(now, all);
        if due.is_empty() {
            return Ok(0);
        }
        let interval_secs = self.limits.interval.as_secs();
        let ctxs: Vec<AuditContext> =
            due.iter().map(|s| AuditContext { actor: None, request_id: None, source_ip: s.source.clone() }).collect();
        let events: Vec<PendingEvent<'_>> = due
            .iter()
            .zip(&ctxs)
            .map(|(s, ctx)| PendingEvent {
                ctx,
                type_: "auth.refusals",
                outcome: Outcome::Denied,
                user_id: None,
                details: summary_details(s, interval_secs).to_string(),
            })
            .collect();
        let result = async {
            let mut tx = db.begin_write().await?;
            audit::record_many(&mut tx.conn(), keyring, &events).await?;
            tx.commit().await
        }
        .await;
        drop(events);
        match result {
            Ok(()) => Ok(due.len()),
            Err(e) => {
                self.restore(due);
                Err(e)
            }
        }
    }
}

fn summary_details(s: &Summary, interval_secs: u64) -> serde_json::Value {
    let mut reasons: Vec<(&&str, &u64)> = s.reasons.iter().collect();
    reasons.sort();
    let reasons: serde_json::Map<String, serde_json::Value> =
        reasons.into_iter().map(|(k, v)| ((*k).to_string(), json!(v))).collect();
    let mut d = json!({
        "count": s.count,
        "throttled": s.throttled,
        "individually_recorded": s.recorded,
        "first_at": s.first.to_rfc3339_opts(SecondsFormat::Micros, true),
        "last_at": s.last.to_rfc3339_opts(SecondsFormat::Micros, true),
        "window_start": s.window_start.to_rfc3339_opts(SecondsFormat::Micros, true),
        "interval_secs": interval_secs,
        "reasons": reasons,
    });
    if s.sources != 1 {
        d["sources"] = json!(s.sources);
    }
    d
}

fn retry_after(end: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    let ms = (end - now).num_milliseconds().max(0) as u64;
    ms.div_ceil(1000).max(1)
}

/// Queues a closed window's summary; past `cap` queued, merges it into the overflow summary.
fn push_pending(pending: &mut Vec<Summary>, overflow: &mut Option<Summary>, s: Summary, cap: usize) {
    if pending.len() < cap {
        pending.push(s);
        return;
    }
    match overflow {
        None => {
            *overflow = Some(Summary { source: None, ..s });
        }
        Some(o) => {
            o.count += s.count;
            o.throttled += s.throttled;
            o.recorded += s.recorded;
            o.first = o.first.min(s.first);
            o.last = o.last.max(s.last);
            o.window_start = o.window_start.min(s.window_start);
            o.sources += s.sources;
            for (k, v) in s.reasons {
                *o.reasons.entry(k).or_default() += v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_790_000_000_000 + ms).unwrap()
    }

    #[test]
    fn individual_then_summed_then_throttled_per_window() {
        let r = Refusals::new(RefusalLimits { budget: 20, ..RefusalLimits::default() });
        let ip = Some("10.0.0.1".parse().unwrap());
        let verdicts: Vec<Verdict> = (0..25).map(|i| r.refuse(ip, "unknown_key", t(i))).collect();
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Record));
        assert!(verdicts[10..20].iter().all(|v| *v == Verdict::Summed));
        assert!(verdicts[20..].iter().all(|v| *v == Verdict::Throttled { retry_after: 60 }));
        assert_eq!(r.throttled(ip, t(30)), Some(60));
        assert_eq!(r.throttled(Some("10.0.0.2".parse().unwrap()), t(30)), None);
        assert!(r.take_due(t(59_000), false).is_empty(), "the window is still open");
        let due = r.take_due(t(60_000), false);
        assert_eq!(due.len(), 1);
        let s = &due[0];
        assert_eq!((s.count, s.throttled, s.recorded), (15, 5, 10));
        assert_eq!((s.first, s.last), (t(10), t(24)));
        assert_eq!(r.throttled(ip, t(60_000)), None, "a new window");
        assert_eq!(r.refuse(ip, "unknown_key", t(60_001)), Verdict::Record);
    }

    #[test]
    fn the_table_is_bounded() {
        let r = Refusals::new(RefusalLimits { max_sources: 100, individual: 0, ..RefusalLimits::default() });
        for i in 0..10_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            r.refuse(Some(ip), "unknown_key", t(i64::from(i)));
        }
        let t2 = r.lock();
        assert!(t2.entries.len() <= 100);
        assert!(t2.pending.len() <= 100);
        drop(t2);
        let due = r.take_due(t(0), true);
        let total: u64 = due.iter().map(|s| s.count).sum();
        assert_eq!(total, 10_000, "nothing is lost");
    }
}
