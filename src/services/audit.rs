//! The audit trail: one event per security-relevant act, written in the act's own transaction,
//! each event sealed with an HMAC chained over the previous one, and the check of that chain.
//!
//! Details are built by the callers from non-secret facts only (ids, kinds, versions, reasons);
//! nothing here ever receives a token, code, key or resume state.
//!
//! **The chain.** `audit_chain` (one row) holds the last `seq` handed out and the last event's
//! HMAC. Writing an event advances the head (`UPDATE ... RETURNING`: the row lock serialises
//! writers across instances on PostgreSQL; SQLite has one writer anyway), computes
//! `hmac = HMAC-SHA256(K, prev_hmac || canonical(event))` with `K = keyring.derive(active key id,
//! "audit-chain/v1")`, inserts the event with that key id (`chain_key_id`) and stores the new
//! HMAC in the head. [`verify`] recomputes the chain; [`reseal`] moves it to the active key after
//! a rotation.
//!
//! **The head is authenticated.** The head row also carries a MAC, `HMAC-SHA256(K_head, chain
//! id || last_seq || last_hmac || anchor_seq || anchor_hmac || head_key_id)` with `K_head =
//! keyring.derive(head_key_id, "audit-head/v1")`, rewritten with every append. Deleting the
//! newest events and rewinding the head to the new last event, or wiping the log and zeroing the
//! head, cannot be done without the key: [`verify`] reports it, naming the first seq after the
//! rewritten head. (Restoring head and rows together from an older copy of the same database is
//! a consistent older state and cannot be told apart from inside; that needs an external
//! witness, e.g. signed checkpoints kept elsewhere.)
//!
//! **Retention.** [`purge_before`] removes the oldest events (a prefix of the chain, each checked
//! before it goes) and moves the head's *anchor* to the last removed event: its seq and HMAC,
//! which the oldest retained event chains from. The anchor is under the head MAC too, so moving
//! it without the key is found like a rewind.

use std::{collections::HashMap, sync::Arc};

use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{KeyInit, Mac};
use serde::Serialize;
use serde_json::Value;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::{
    crypto::Keyring,
    store::{
        self, Conn, Db, StoreError,
        audit::{AuditRow, ChainHead, EventFilter, NewAuditEvent, Snapshot},
    },
};

/// The label of the chain's HMAC key, derived per keyring key (`Keyring::derive`).
pub const CHAIN_KEY_LABEL: &str = "audit-chain/v1";
/// The label of the head's MAC key.
pub const HEAD_KEY_LABEL: &str = "audit-head/v1";
/// Domain separation for the head MAC's input.
const HEAD_TAG: &[u8] = b"centraldb-mfa/audit-head/v1";
/// Domain separation for the canonical encoding (changes if the encoding ever does).
const CANONICAL_TAG: &[u8] = b"centraldb-mfa/audit-event/v1";
/// Events read per round trip when verifying or re-sealing.
const PAGE: i64 = 1000;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Who did it and from where: filled in by the HTTP layer (or the CLI).
#[derive(Debug, Clone, Default)]
pub struct AuditContext {
    /// The API key id (`key:<uuid>`), or `cli`, `system`.
    pub actor: Option<String>,
    pub request_id: Option<String>,
    pub source_ip: Option<String>,
}

impl AuditContext {
    pub fn system(actor: &str) -> Self {
        Self { actor: Some(actor.to_string()), ..Self::default() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    Denied,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [Self::Success, Self::Failure, Self::Denied, Self::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// The audit writer a service holds: the keyring that seals the chain.
#[derive(Clone)]
pub struct Auditor {
    keyring: Arc<Keyring>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auditor")
    }
}

impl Auditor {
    pub fn new(keyring: Arc<Keyring>) -> Self {
        Self { keyring }
    }

    /// Writes one audit event through `c`, which must be the act's own write transaction: if
    /// this fails, the caller returns the error and the act is rolled back with it. Returns the
    /// event's `seq`.
    pub async fn record(
        &self,
        c: &mut Conn<'_>,
        ctx: &AuditContext,
        type_: &str,
        outcome: Outcome,
        user_id: Option<&str>,
        details: Value,
    ) -> store::Result<i64> {
        record(c, &self.keyring, ctx, type_, outcome, user_id, details).await
    }
}

/// [`Auditor::record`] for callers that hold a `&Keyring` rather than an `Auditor`.
pub async fn record(
    c: &mut Conn<'_>,
    keyring: &Keyring,
    ctx: &AuditContext,
    type_: &str,
    outcome: Outcome,
    user_id: Option<&str>,
    details: Value,
) -> store::Result<i64> {
    let event = PendingEvent { ctx, type_, outcome, user_id, details: details.to_string() };
    let written = record_many(c, keyring, std::slice::from_ref(&event)).await;
    crate::telemetry::audit_events(written.is_ok(), 1);
    written
}

/// One event of a batch written by [`record_many`].
pub struct PendingEvent<'a> {
    pub ctx: &'a AuditContext,
    pub type_: &'a str,
    pub outcome: Outcome,
    pub user_id: Option<&'a str>,
    pub details: String,
}

/// Writes many events through `c` (a write transaction) with O(1) statements: the head is
/// advanced once by the batch size, the HMACs are chained here, the rows go in multi-row
/// INSERTs and the head's HMAC is set once. The events get consecutive seqs in slice order;
/// returns the last one (0 for no events).
pub async fn record_many(c: &mut Conn<'_>, keyring: &Keyring, events: &[PendingEvent<'_>]) -> store::Result<i64> {
    let Some(n) = i64::try_from(events.len()).ok().filter(|n| *n > 0) else { return Ok(0) };
    let chain_key_id = keyring.active_key_id();
    let key = keyring
        .derive(chain_key_id, CHAIN_KEY_LABEL)
        .ok_or_else(|| StoreError::Other("the active key cannot derive the audit chain key".into()))?;
    let head_key = head_key(keyring, chain_key_id)?;
    // In a SQLite group the head is cached in memory (the group holds the write lock); else
    // the head row is advanced here, and its HMAC set below.
    let cached = store::audit::cached_head(c).await?;
    let is_cached = cached.is_some();
    let (first_seq, mut head) = match cached {
        Some(head) => (head.last_seq + 1, head),
        None => {
            let head = store::audit::advance_head_by(c, n).await?;
            (head.last_seq - n + 1, head)
        }
    };
    let mut prev = std::mem::take(&mut head.last_hmac);
    let last_seq = first_seq + n - 1;
    let views: Vec<EventView<'_>> = (first_seq..)
        .zip(events)
        .map(|(seq, e)| EventView {
            seq,
            id: Uuid::now_v7(),
            at: store::now(),
            type_: e.type_,
            outcome: e.outcome.as_str(),
            user_id: e.user_id,
            actor: e.ctx.actor.as_deref(),
            request_id: e.ctx.request_id.as_deref(),
            source_ip: e.ctx.source_ip.as_deref(),
            details: &e.details,
        })
        .collect();
    let mut hmacs = Vec::with_capacity(views.len());
    for view in &views {
        let hmac = seal(&key, &prev, view, chain_key_id);
        prev.clone_from(&hmac);
        hmacs.push(hmac);
    }
    let rows: Vec<NewAuditEvent<'_>> =
        views.iter().zip(&hmacs).map(|(view, hmac)| view.sealed(chain_key_id, hmac)).collect();
    store::audit::insert_many(c, &rows).await?;
    head.last_seq = last_seq;
    head.last_hmac = prev;
    seal_head(&head_key, chain_key_id, &mut head);
    if is_cached {
        store::audit::set_cached_head(c, head);
    } else {
        store::audit::write_head(c, &head).await?;
    }
    Ok(last_seq)
}

/// The head MAC key under `key_id`.
fn head_key(keyring: &Keyring, key_id: &str) -> store::Result<Zeroizing<[u8; 32]>> {
    keyring
        .derive(key_id, HEAD_KEY_LABEL)
        .ok_or_else(|| StoreError::Other(format!("key '{key_id}' cannot derive the audit head key")))
}

/// `HMAC-SHA256(K_head, tag || chain id || last_seq || last_hmac || anchor_seq || anchor_hmac ||
/// key id)`, each field length-prefixed.
fn head_mac(key: &[u8; 32], h: &ChainHead, key_id: &str) -> Vec<u8> {
    let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(key) else { return Vec::new() };
    for f in [
        HEAD_TAG,
        &store::audit::CHAIN_ID.to_be_bytes(),
        &h.last_seq.to_be_bytes(),
        &h.last_hmac,
        &h.anchor_seq.to_be_bytes(),
        &h.anchor_hmac,
        key_id.as_bytes(),
    ] {
        mac.update(&(f.len() as u32).to_be_bytes());
        mac.update(f);
    }
    mac.finalize().into_bytes().to_vec()
}

/// Sets the head's MAC (under `key_id`) for its current fields.
fn seal_head(key: &[u8; 32], key_id: &str, h: &mut ChainHead) {
    h.head_mac = Some(head_mac(key, h, key_id));
    h.head_key_id = Some(key_id.to_string());
}

/// Checks the head's MAC; `Err` says what is wrong.
fn check_head(keys: &mut ChainKeys<'_>, h: &ChainHead) -> Result<(), String> {
    let (Some(key_id), Some(mac)) = (&h.head_key_id, &h.head_mac) else {
        return Err("the chain head carries no MAC (it is sealed at the first start after the upgrade, \
                    or by `rewrap`)"
            .into());
    };
    let Some(key) = keys.head(key_id) else {
        return Err(format!(
            "the chain head is sealed under key id '{}', which the keyring does not contain",
            key_id.escape_default()
        ));
    };
    if bool::from(head_mac(key, h, key_id).ct_eq(mac)) {
        Ok(())
    } else {
        Err("the chain head's MAC does not verify: the head (its last seq, last HMAC or retention anchor) \
             was rewritten without the key, e.g. to hide events removed from the end"
            .into())
    }
}

/// The fields an event's HMAC covers (besides the previous HMAC and the chain key id).
struct EventView<'a> {
    seq: i64,
    id: Uuid,
    at: DateTime<Utc>,
    type_: &'a str,
    outcome: &'a str,
    user_id: Option<&'a str>,
    actor: Option<&'a str>,
    request_id: Option<&'a str>,
    source_ip: Option<&'a str>,
    details: &'a str,
}

impl<'a> EventView<'a> {
    /// The row to store: this event with its seal.
    fn sealed(&self, chain_key_id: &'a str, hmac: &'a [u8]) -> NewAuditEvent<'a> {
        NewAuditEvent {
            seq: self.seq,
            id: self.id,
            at: self.at,
            type_: self.type_,
            outcome: self.outcome,
            user_id: self.user_id,
            actor: self.actor,
            request_id: self.request_id,
            source_ip: self.source_ip,
            details: self.details,
            chain_key_id,
            hmac,
        }
    }
}

impl<'a> From<&'a AuditRow> for EventView<'a> {
    fn from(r: &'a AuditRow) -> Self {
        Self {
            seq: r.seq,
            id: r.id,
            at: r.at,
            type_: &r.type_,
            outcome: &r.outcome,
            user_id: r.user_id.as_deref(),
            actor: r.actor.as_deref(),
            request_id: r.request_id.as_deref(),
            source_ip: r.source_ip.as_deref(),
            details: &r.details,
        }
    }
}

/// An unambiguous encoding of an event: every field is `0x00` (NULL) or `0x01`, a big-endian
/// u32 length and the bytes, so no two different events (NULL vs "" included) encode alike.
/// `at` is RFC 3339 with microseconds and `Z`, the precision both databases store.
fn canonical(e: &EventView<'_>, chain_key_id: &str) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, v: Option<&[u8]>) {
        match v {
            None => out.push(0),
            Some(b) => {
                out.push(1);
                out.extend_from_slice(&(b.len() as u32).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }
    let at = e.at.to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut out = Vec::with_capacity(256 + e.details.len());
    field(&mut out, Some(CANONICAL_TAG));
    field(&mut out, Some(&e.seq.to_be_bytes()));
    field(&mut out, Some(e.id.as_bytes()));
    field(&mut out, Some(at.as_bytes()));
    field(&mut out, Some(e.type_.as_bytes()));
    field(&mut out, Some(e.outcome.as_bytes()));
    field(&mut out, e.user_id.map(str::as_bytes));
    field(&mut out, e.actor.map(str::as_bytes));
    field(&mut out, e.request_id.map(str::as_bytes));
    field(&mut out, e.source_ip.map(str::as_bytes));
    field(&mut out, Some(e.details.as_bytes()));
    field(&mut out, Some(chain_key_id.as_bytes()));
    out
}

/// `HMAC-SHA256(key, prev_hmac || canonical(event))`.
fn seal(key: &[u8; 32], prev_hmac: &[u8], e: &EventView<'_>, chain_key_id: &str) -> Vec<u8> {
    // HMAC takes keys of any length, so this cannot fail; an empty MAC would never verify.
    let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(key) else { return Vec::new() };
    mac.update(prev_hmac);
    mac.update(&canonical(e, chain_key_id));
    mac.finalize().into_bytes().to_vec()
}

/// The result of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct VerifyReport {
    /// Every retained event verified, `seq` runs without a gap from the oldest retained event
    /// to N, and the chain head (its MAC checked) matches event N.
    pub ok: bool,
    /// Events verified before the check stopped (all of them when `ok`).
    pub events_checked: u64,
    /// The first event that is missing, altered, moved or cannot be checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad_seq: Option<i64>,
    /// What was found, when not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Events up to this seq were removed by the retention purge; the chain is verified from
    /// the next one (absent when nothing was purged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purged_through: Option<i64>,
}

impl VerifyReport {
    fn good(events_checked: u64) -> Self {
        Self { ok: true, events_checked, first_bad_seq: None, reason: None, purged_through: None }
    }
    fn bad(events_checked: u64, first_bad_seq: Option<i64>, reason: impl Into<String>) -> Self {
        Self { ok: false, events_checked, first_bad_seq, reason: Some(reason.into()), purged_through: None }
    }
    fn purged(mut self, anchor_seq: i64) -> Self {
        self.purged_through = (anchor_seq > 0).then_some(anchor_seq);
        self
    }
}

/// Re-sealing in progress: the new chain, under the active key.
struct Reseal<'k> {
    key_id: &'k str,
    key: Zeroizing<[u8; 32]>,
    prev: Vec<u8>,
    started: bool,
    count: u64,
}

/// Chain keys by key id, derived once per walk.
struct ChainKeys<'k> {
    keyring: &'k Keyring,
    keys: HashMap<String, Zeroizing<[u8; 32]>>,
    head: Option<(String, Zeroizing<[u8; 32]>)>,
}

impl<'k> ChainKeys<'k> {
    fn new(keyring: &'k Keyring) -> Self {
        Self { keyring, keys: HashMap::new(), head: None }
    }

    fn get(&mut self, key_id: &str) -> Option<&[u8; 32]> {
        if !self.keys.contains_key(key_id) {
            let key = self.keyring.derive(key_id, CHAIN_KEY_LABEL)?;
            self.keys.insert(key_id.to_string(), key);
        }
        self.keys.get(key_id).map(|k| &**k)
    }

    fn head(&mut self, key_id: &str) -> Option<&[u8; 32]> {
        if self.head.as_ref().is_none_or(|(id, _)| id != key_id) {
            self.head = Some((key_id.to_string(), self.keyring.derive(key_id, HEAD_KEY_LABEL)?));
        }
        self.head.as_ref().map(|(_, k)| &**k)
    }
}

/// Walks the retained log in `seq` order against `head` (from its anchor on), stopping at the
/// first bad event, then checks the head: its seq and HMAC against the last event, and its MAC
/// (an unsealed head passes only with `accept_unsealed`, when the caller is about to seal it).
/// With `reseal`, every event from the first one not under the active key on is re-sealed
/// under it as it passes (the caller rolls back if the report is not ok, and writes the head).
async fn walk(
    c: &mut Conn<'_>,
    keyring: &Keyring,
    head: &ChainHead,
    mut reseal: Option<&mut Reseal<'_>>,
    accept_unsealed: bool,
) -> store::Result<VerifyReport> {
    let mut keys = ChainKeys::new(keyring);
    let head_check = match check_head(&mut keys, head) {
        Err(_) if accept_unsealed && head.head_mac.is_none() => Ok(()),
        other => other,
    };
    let mut prev = head.anchor_hmac.clone();
    let mut expected: i64 = head.anchor_seq + 1;
    let mut checked: u64 = 0;
    if let Some(r) = reseal.as_deref_mut() {
        r.prev.clone_from(&prev);
    }
    // While `expected <= slow_until`, rows are read one at a time (see below).
    let mut slow_until: i64 = 0;
    if let Some(first) = store::audit::next_seq(c, i64::MIN).await?
        && first < expected
    {
        let report = if head.anchor_seq == 0 {
            VerifyReport::bad(0, Some(first), format!("an event has seq {first}, outside the chain (seq starts at 1)"))
        } else {
            VerifyReport::bad(
                0,
                Some(first),
                format!(
                    "an event has seq {first}, at or before the retention anchor (events through seq {} were purged)",
                    head.anchor_seq
                ),
            )
        };
        return Ok(report.purged(head.anchor_seq));
    }
    loop {
        let size = if expected <= slow_until { 1 } else { PAGE };
        let page = match store::audit::chain_page(c, expected - 1, size).await {
            Ok(p) => p,
            // A row that cannot be decoded (a column altered to an invalid value): go through
            // that page one row at a time, so the rows before it are still checked and the bad
            // one is named.
            Err(StoreError::Other(_)) if size > 1 => {
                slow_until = expected - 1 + PAGE;
                continue;
            }
            Err(StoreError::Other(e)) => {
                let seq = store::audit::next_seq(c, expected - 1).await?.unwrap_or(expected);
                tracing::warn!(seq, error = %e, "audit event cannot be read");
                return Ok(if seq > expected {
                    missing(checked, expected, seq)
                } else {
                    VerifyReport::bad(
                        checked,
                        Some(seq),
                        format!("the event at seq {seq} cannot be read (a column holds an invalid value)"),
                    )
                }
                .purged(head.anchor_seq));
            }
            Err(e) => return Err(e),
        };
        if page.is_empty() {
            break;
        }
        for row in &page {
            let seq = row.event.seq;
            if seq != expected {
                return Ok(missing(checked, expected, seq).purged(head.anchor_seq));
            }
            let Some(key) = keys.get(&row.chain_key_id) else {
                return Ok(VerifyReport::bad(
                    checked,
                    Some(seq),
                    format!(
                        "the event is sealed under key id '{}', which the keyring does not contain",
                        row.chain_key_id.escape_default()
                    ),
                )
                .purged(head.anchor_seq));
            };
            let view = EventView::from(&row.event);
            let mac = seal(key, &prev, &view, &row.chain_key_id);
            if !bool::from(mac.ct_eq(&row.hmac)) {
                return Ok(VerifyReport::bad(
                    checked,
                    Some(seq),
                    "HMAC mismatch: the event was altered, replaced or moved, or an earlier event was",
                )
                .purged(head.anchor_seq));
            }
            if let Some(r) = reseal.as_deref_mut() {
                r.started |= row.chain_key_id != r.key_id;
                if r.started {
                    let new = seal(&r.key, &r.prev, &view, r.key_id);
                    store::audit::reseal(c, seq, r.key_id, &new).await?;
                    r.prev = new;
                    r.count += 1;
                } else {
                    r.prev.clone_from(&row.hmac);
                }
            }
            prev.clone_from(&row.hmac);
            expected += 1;
            checked += 1;
        }
    }
    let last_seq = expected - 1;
    // A head rewritten without the key: whatever it says about the end of the log is not to be
    // trusted, so the first seq it does not vouch for is named.
    if let Err(why) = head_check {
        return Ok(VerifyReport::bad(checked, Some(head.last_seq.min(last_seq) + 1), why).purged(head.anchor_seq));
    }
    if head.last_seq > last_seq {
        return Ok(VerifyReport::bad(
            checked,
            Some(last_seq + 1),
            format!(
                "the chain head records {} event(s) but the log ends at seq {last_seq}: events were removed from the end",
                head.last_seq
            ),
        )
        .purged(head.anchor_seq));
    }
    if head.last_seq < last_seq {
        return Ok(VerifyReport::bad(
            checked,
            Some(head.last_seq + 1),
            format!("the log runs to seq {last_seq} but the chain head records only {} event(s)", head.last_seq),
        )
        .purged(head.anchor_seq));
    }
    if !bool::from(head.last_hmac.ct_eq(&prev)) {
        return Ok(VerifyReport::bad(
            checked,
            (last_seq > 0).then_some(last_seq),
            "the chain head's HMAC does not match the last event (the head or the last event was replaced)",
        )
        .purged(head.anchor_seq));
    }
    Ok(VerifyReport::good(checked).purged(head.anchor_seq))
}

fn missing(checked: u64, expected: i64, next: i64) -> VerifyReport {
    VerifyReport::bad(
        checked,
        Some(expected),
        format!("event seq {expected} is missing (the next event is seq {next})"),
    )
}

fn head_missing() -> VerifyReport {
    VerifyReport::bad(0, None, "the chain head (audit_chain row 1) is missing")
}

/// Checks the whole chain, as of one consistent snapshot: the head's MAC, `seq` contiguous from
/// the oldest retained event, each HMAC (under the key its `chain_key_id` names), and the head
/// against the last event.
pub async fn verify(db: &Db, keyring: &Keyring) -> store::Result<VerifyReport> {
    let mut snap = Snapshot::begin(db).await?;
    let report = match store::audit::read_head(&mut snap.conn()).await? {
        None => head_missing(),
        Some(head) => walk(&mut snap.conn(), keyring, &head, None, false).await?,
    };
    snap.end().await?;
    Ok(report)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResealReport {
    /// The chain as found (before re-sealing). Nothing is re-sealed unless it is ok.
    pub verified: VerifyReport,
    /// Events whose seal was rewritten under the active key.
    pub resealed: u64,
}

/// Verifies the chain and re-seals it under the active key, in one write transaction with the
/// head locked (no event is appended meanwhile). Only events from the first one sealed under
/// another key on are rewritten (a chain already under the active key is left as it is); the
/// head is MACed under the active key. A chain that does not verify is left untouched and
/// reported. A head not sealed yet (a database from before the head MAC) is sealed here when
/// the events verify.
pub async fn reseal(db: &Db, keyring: &Keyring) -> store::Result<ResealReport> {
    let key_id = keyring.active_key_id();
    let key = keyring
        .derive(key_id, CHAIN_KEY_LABEL)
        .ok_or_else(|| StoreError::Other("the active key cannot derive the audit chain key".into()))?;
    let hkey = head_key(keyring, key_id)?;
    let mut tx = db.begin_write().await?;
    let Some(mut head) = store::audit::lock_head(&mut tx.conn()).await? else {
        return Ok(ResealReport { verified: head_missing(), resealed: 0 });
    };
    let mut state = Reseal { key_id, key, prev: Vec::new(), started: false, count: 0 };
    let verified = walk(&mut tx.conn(), keyring, &head, Some(&mut state), true).await?;
    if !verified.ok {
        // Dropping the transaction rolls back whatever was rewritten before the bad event.
        return Ok(ResealReport { verified, resealed: 0 });
    }
    if state.started || head.head_key_id.as_deref() != Some(key_id) || head.head_mac.is_none() {
        head.last_hmac = state.prev;
        seal_head(&hkey, key_id, &mut head);
        store::audit::write_head(&mut tx.conn(), &head).await?;
    }
    tx.commit().await?;
    Ok(ResealReport { verified, resealed: state.count })
}

/// Seals a head that carries no MAC yet (a database from before the head MAC), if the chain
/// verifies; run at start-up. Returns whether it sealed one. A chain that does not verify is
/// left as it is (and `verify` keeps reporting it).
pub async fn seal_unsealed_head(db: &Db, keyring: &Keyring) -> store::Result<bool> {
    {
        let mut c = db.read().await?;
        match store::audit::read_head(&mut c.conn()).await? {
            Some(h) if h.head_mac.is_none() => {}
            _ => return Ok(false),
        }
    }
    let hkey = head_key(keyring, keyring.active_key_id())?;
    let mut tx = db.begin_write().await?;
    let Some(mut head) = store::audit::lock_head(&mut tx.conn()).await? else { return Ok(false) };
    if head.head_mac.is_some() {
        return Ok(false);
    }
    let report = walk(&mut tx.conn(), keyring, &head, None, true).await?;
    if !report.ok {
        tracing::warn!(first_bad_seq = ?report.first_bad_seq, reason = ?report.reason,
            "the audit chain does not verify: its head is left without a MAC");
        return Ok(false);
    }
    seal_head(&hkey, keyring.active_key_id(), &mut head);
    store::audit::write_head(&mut tx.conn(), &head).await?;
    tx.commit().await?;
    tracing::info!(events = report.events_checked, "audit chain head sealed (MAC under the active key)");
    Ok(true)
}

/// What one retention purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Events removed.
    pub events: u64,
    /// The new anchor: the last removed seq (unchanged when nothing was removed).
    pub through_seq: i64,
    /// A due event that does not verify: the purge stopped before it, keeping the evidence.
    pub stopped_at: Option<i64>,
}

/// Events removed per transaction by [`purge_before`].
const PURGE_BATCH: i64 = 2000;

/// Removes the oldest events recorded before `cutoff` (a prefix of the chain: it stops at the
/// first event at or after `cutoff`), a batch per write transaction. Each event is checked
/// before it goes (a purge never destroys evidence of tampering: it stops before a bad event).
/// Each batch moves the head's anchor to its last event, re-MACs the head and records an
/// `audit.purged` event, all in its transaction.
pub async fn purge_before(db: &Db, keyring: &Keyring, cutoff: DateTime<Utc>) -> store::Result<PurgeReport> {
    let key_id = keyring.active_key_id();
    let hkey = head_key(keyring, key_id)?;
    let mut report = PurgeReport::default();
    let mut keys = ChainKeys::new(keyring);
    loop {
        let mut tx = db.begin_write().await?;
        let mut c = tx.conn();
        let Some(mut head) = store::audit::lock_head(&mut c).await? else { break };
        report.through_seq = head.anchor_seq;
        // Never purge from a head that does not verify (nor seal a forged one).
        if check_head(&mut keys, &head).is_err() {
            report.stopped_at = Some(head.anchor_seq + 1);
            break;
        }
        let page = store::audit::chain_page(&mut c, head.anchor_seq, PURGE_BATCH).await?;
        let mut prev = head.anchor_hmac.clone();
        let mut through = head.anchor_seq;
        for row in &page {
            if row.event.at >= cutoff || row.event.seq != through + 1 || row.event.seq > head.last_seq {
                break;
            }
            let ok = keys.get(&row.chain_key_id).is_some_and(|key| {
                let mac = seal(key, &prev, &EventView::from(&row.event), &row.chain_key_id);
                bool::from(mac.ct_eq(&row.hmac))
            });
            if !ok {
                report.stopped_at = Some(row.event.seq);
                break;
            }
            prev.clone_from(&row.hmac);
            through = row.event.seq;
        }
        if through == head.anchor_seq {
            break;
        }
        let removed = store::audit::delete_through(&mut c, through).await?;
        head.anchor_seq = through;
        head.anchor_hmac = prev;
        seal_head(&hkey, key_id, &mut head);
        store::audit::write_head(&mut c, &head).await?;
        record(
            &mut c,
            keyring,
            &AuditContext::system("sweeper"),
            "audit.purged",
            Outcome::Success,
            None,
            serde_json::json!({"events": removed, "through_seq": through,
                               "older_than": cutoff.to_rfc3339_opts(SecondsFormat::Secs, true)}),
        )
        .await?;
        tx.commit().await?;
        report.events += removed;
        report.through_seq = through;
        if report.stopped_at.is_some() || (page.len() as i64) < PURGE_BATCH {
            break;
        }
    }
    if let Some(seq) = report.stopped_at {
        tracing::warn!(seq, "audit retention purge stopped: the event does not verify, so it is kept");
    }
    Ok(report)
}

/// A page of events, oldest first (`GET /audit/events`). Reading is not audited.
pub async fn events(db: &Db, filter: &EventFilter<'_>) -> store::Result<Vec<AuditRow>> {
    let mut c = db.read().await?;
    store::audit::query(&mut c.conn(), filter).await
}

/// The key ids the audit chain is sealed under (start-up checks them against the keyring).
pub async fn chain_key_ids(c: &mut Conn<'_>) -> store::Result<Vec<String>> {
    store::audit::chain_key_ids(c).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(user_id: Option<&'a str>, actor: Option<&'a str>) -> EventView<'a> {
        EventView {
            seq: 1,
            id: Uuid::nil(),
            at: DateTime::from_timestamp(1_790_000_000, 123_456_000).unwrap(),
            type_: "token.read",
            outcome: "success",
            user_id,
            actor,
            request_id: None,
            source_ip: None,
            details: "{}",
        }
    }

    #[test]
    fn canonical_distinguishes_null_empty_and_shifted_fields() {
        let a = canonical(&view(None, Some("x")), "k1");
        let b = canonical(&view(Some(""), Some("x")), "k1");
        let c = canonical(&view(Some("x"), None), "k1");
        let d = canonical(&view(Some("x"), Some("")), "k1");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(b, d);
        assert_ne!(c, d);
        assert_ne!(canonical(&view(None, None), "k1"), canonical(&view(None, None), "k2"));
        let at = String::from_utf8_lossy(&a).into_owned();
        assert!(at.contains("2026-09-21T14:13:20.123456Z"), "{at}");
    }

    /// The chain key and the seals of a chain of events computed by `scripts/make-vectors.py`
    /// (Python `hmac`/`hashlib`, from the definitions in this module's docs and
    /// `Keyring::derive`): the derivation and every seal must match byte for byte.
    #[test]
    fn seals_match_the_python_known_answers() {
        let doc: Value = serde_json::from_str(include_str!("../../tests/fixtures/audit-chain-vectors.json")).unwrap();
        let keyring =
            Keyring::parse(&secrecy::SecretString::from(doc["key_spec"].as_str().unwrap().to_string())).unwrap();
        let key_id = doc["chain_key_id"].as_str().unwrap();
        assert_eq!(doc["label"], CHAIN_KEY_LABEL);
        let key = keyring.derive(key_id, CHAIN_KEY_LABEL).unwrap();
        assert_eq!(hex::encode(*key), doc["chain_key_hex"].as_str().unwrap(), "the derived chain key");
        let events = doc["events"].as_array().unwrap();
        assert_eq!(events.len(), 4);
        let text = |v: &Value| v.as_str().map(str::to_string);
        let mut prev = vec![0u8; 32];
        for e in events {
            let (type_, outcome, details) = (text(&e["type"]), text(&e["outcome"]), text(&e["details"]));
            let (user_id, actor) = (text(&e["user_id"]), text(&e["actor"]));
            let (request_id, source_ip) = (text(&e["request_id"]), text(&e["source_ip"]));
            let view = EventView {
                seq: e["seq"].as_i64().unwrap(),
                id: Uuid::parse_str(e["id"].as_str().unwrap()).unwrap(),
                at: DateTime::parse_from_rfc3339(e["at"].as_str().unwrap()).unwrap().with_timezone(&Utc),
                type_: type_.as_deref().unwrap(),
                outcome: outcome.as_deref().unwrap(),
                user_id: user_id.as_deref(),
                actor: actor.as_deref(),
                request_id: request_id.as_deref(),
                source_ip: source_ip.as_deref(),
                details: details.as_deref().unwrap(),
            };
            let mac = seal(&key, &prev, &view, key_id);
            assert_eq!(hex::encode(&mac), e["hmac_hex"].as_str().unwrap(), "seq {}", view.seq);
            prev = mac;
        }
    }

    #[test]
    fn seal_depends_on_key_and_previous_hmac() {
        let e = view(None, None);
        let k1 = [1u8; 32];
        let k2 = [2u8; 32];
        let s = seal(&k1, &[0; 32], &e, "k1");
        assert_eq!(s.len(), 32);
        assert_ne!(s, seal(&k2, &[0; 32], &e, "k1"));
        assert_ne!(s, seal(&k1, &[1; 32], &e, "k1"));
    }
}
