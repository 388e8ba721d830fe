//! The audit trail: one event per security-relevant act, written in the act's own transaction,
//! each event sealed with an HMAC chained over the previous one, and the check of that chain.
//!
//! Details are built by the callers from non-secret facts only (ids, kinds, versions, reasons);
//! nothing here ever receives a token, code, key or resume state.
//!
//! **The chains.** The log is partitioned into [`store::audit::PARTITIONS`] chains (256, fixed
//! by migration 0008 and recorded in the database). An event goes into the chain of its user
//! (`SHA-256(tag || "u" || user id)`), or, without a user, of its source address (refusals), or
//! else of its actor (system events: the sweeper, the CLI) — see [`chain_of`]. Each chain has
//! its own head row (`audit_heads`: position, seq and HMAC of its last event, retention anchor,
//! head MAC) and its own HMAC chain: `hmac = HMAC-SHA256(K, prev_hmac || canonical(event))`,
//! where the encoding covers the global `seq`, the chain id and the position in the chain, and
//! `K = keyring.derive(active key id, "audit-chain/v1")`. Writing events locks only the heads of
//! their chains (PostgreSQL `FOR UPDATE`, in chain order), so writers of different users never
//! wait for each other; the global `seq` orders `GET /audit/events` and comes from a sequence
//! (PostgreSQL; gaps from rolled-back writes are not tampering) or a counter cached per group
//! commit (SQLite). Within a chain, seq grows with the position (taken after the head lock).
//!
//! **The legacy chain.** Events written before migration 0008 keep `chain_id`/`pos` NULL: the
//! closed legacy chain, verified with its own (v1) encoding against its head in `audit_chain`,
//! which no new event advances. It is re-sealed and purged like the others.
//!
//! **The heads are authenticated.** Every head carries a MAC under `K_head =
//! keyring.derive(head_key_id, "audit-head/v1")` over all its fields, rewritten with every
//! append. Deleting the newest events of a chain and rewinding its head, or wiping the log and
//! zeroing the heads, cannot be done without the key: [`verify`] reports it, naming the first
//! seq the chain can no longer vouch for (the first gap in the global seq after the chain's last
//! verified event). Restoring heads and rows together from an older copy is a consistent older
//! state; [`checkpoint`]s signed with Ed25519 (`keyring.derive(key id, "audit-checkpoint/v1")`
//! as the seed) and kept elsewhere reveal it ([`verify_checkpoint`]).
//!
//! **Retention.** [`purge_before`] removes, per chain, the oldest events recorded before the
//! cutoff (each checked before it goes; nothing at or after the first bad one in seq order) and
//! moves the chain's *anchor* to the last removed event, under the head MAC.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::{
    crypto::Keyring,
    store::{
        self, Conn, Db, StoreError,
        audit::{AuditRow, ChainHead, ChainedRow, EventFilter, NewAuditEvent, PARTITIONS, PartHead, Snapshot},
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
/// The encoding of partition events (v2: adds the chain id and position).
const CANONICAL_TAG_V2: &[u8] = b"centraldb-mfa/audit-event/v2";
/// Domain separation for a partition head's MAC.
const PART_HEAD_TAG: &[u8] = b"centraldb-mfa/audit-partition-head/v1";
/// Domain separation for the chain assignment hash.
const PARTITION_TAG: &[u8] = b"centraldb-mfa/audit-partition/v1";
/// The label of the checkpoint signing seed.
pub const CHECKPOINT_KEY_LABEL: &str = "audit-checkpoint/v1";
/// Domain separation for the signed checkpoint message.
const CHECKPOINT_TAG: &[u8] = b"centraldb-mfa/audit-checkpoint/v1";
/// How reports name the legacy chain.
pub const LEGACY_CHAIN: i64 = -1;
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

/// Writes one audit event through `c`, which must be the act's own write transaction: if this
/// fails, the caller returns the error and the act is rolled back with it. Returns the event's
/// `seq`.
///
/// **The one way to write an event.** Every writer in the service (services, the sweeper, the
/// CLI, the HTTP layer's denials) calls this, or [`record_many`] for a batch (group commit,
/// refusal summaries), which it is the one-event form of; nothing else inserts audit rows or
/// advances a chain head for a new event. Callers build the event (type, outcome, user,
/// details) and hand it here.
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
    record_many(c, keyring, std::slice::from_ref(&event)).await
}

/// One event of a batch written by [`record_many`].
pub struct PendingEvent<'a> {
    pub ctx: &'a AuditContext,
    pub type_: &'a str,
    pub outcome: Outcome,
    pub user_id: Option<&'a str>,
    pub details: String,
}

/// The chain an event goes into: of its user; without one, of its source address (refusals);
/// else of its actor (system events). `SHA-256(tag || kind || value)` mod [`PARTITIONS`].
pub fn chain_of(user_id: Option<&str>, source_ip: Option<&str>, actor: Option<&str>) -> i64 {
    let (kind, value): (&[u8], &str) = match (user_id, source_ip) {
        (Some(u), _) => (b"u", u),
        (None, Some(ip)) => (b"s", ip),
        (None, None) => (b"a", actor.unwrap_or("")),
    };
    let mut h = sha2::Sha256::new();
    h.update(PARTITION_TAG);
    h.update(kind);
    h.update(value.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(first) % PARTITIONS as u64) as i64
}

/// Writes many events through `c` (a write transaction) with O(1) statements per chain touched:
/// the heads of their chains are locked (in chain order), the seqs drawn, the HMACs chained
/// here, the rows go in multi-row INSERTs and each head is rewritten once. The events get
/// increasing seqs in slice order; returns the last one (0 for no events). Counts the events
/// written (or not) in the `audit_events` metric.
pub async fn record_many(c: &mut Conn<'_>, keyring: &Keyring, events: &[PendingEvent<'_>]) -> store::Result<i64> {
    let written = write_events(c, keyring, events).await;
    crate::telemetry::audit_events(written.is_ok(), events.len());
    written
}

/// [`record_many`] without the metric.
async fn write_events(c: &mut Conn<'_>, keyring: &Keyring, events: &[PendingEvent<'_>]) -> store::Result<i64> {
    let Some(n) = i64::try_from(events.len()).ok().filter(|n| *n > 0) else { return Ok(0) };
    let chain_key_id = keyring.active_key_id();
    let key = keyring
        .derive(chain_key_id, CHAIN_KEY_LABEL)
        .ok_or_else(|| StoreError::Other("the active key cannot derive the audit chain key".into()))?;
    let head_key = head_key(keyring, chain_key_id)?;
    let chains: Vec<i64> =
        events.iter().map(|e| chain_of(e.user_id, e.ctx.source_ip.as_deref(), e.ctx.actor.as_deref())).collect();
    let mut ids = chains.clone();
    ids.sort_unstable();
    ids.dedup();
    // The seqs are drawn after the heads are locked: within a chain, seq grows with the position.
    let (locked, seqs) = store::audit::lock_part_heads_then_seqs(c, &ids, n).await?;
    let mut heads: BTreeMap<i64, PartHead> = locked.into_iter().map(|h| (h.chain_id, h)).collect();
    if seqs.len() != events.len() {
        return Err(StoreError::Other("the audit seq counter handed out too few seqs".into()));
    }
    let mut views = Vec::with_capacity(events.len());
    let mut hmacs = Vec::with_capacity(events.len());
    for ((e, chain), &seq) in events.iter().zip(&chains).zip(&seqs) {
        let head = heads.get_mut(chain).ok_or_else(|| StoreError::Other(format!("audit chain {chain} has no head")))?;
        let pos = head.last_pos + 1;
        let view = EventView {
            seq,
            chain: Some((*chain, pos)),
            id: Uuid::now_v7(),
            at: store::now(),
            type_: e.type_,
            outcome: e.outcome.as_str(),
            user_id: e.user_id,
            actor: e.ctx.actor.as_deref(),
            request_id: e.ctx.request_id.as_deref(),
            source_ip: e.ctx.source_ip.as_deref(),
            details: &e.details,
        };
        let hmac = seal(&key, &head.last_hmac, &view, chain_key_id);
        head.last_pos = pos;
        head.last_seq = seq;
        head.last_hmac.clone_from(&hmac);
        views.push(view);
        hmacs.push(hmac);
    }
    let rows: Vec<NewAuditEvent<'_>> =
        views.iter().zip(&hmacs).map(|(view, hmac)| view.sealed(chain_key_id, hmac)).collect();
    let mut out: Vec<PartHead> = heads.into_values().collect();
    for h in &mut out {
        seal_part_head(&head_key, chain_key_id, h);
    }
    store::audit::append(c, &rows, out).await?;
    Ok(seqs.last().copied().unwrap_or(0))
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

/// A partition head's MAC: `HMAC-SHA256(K_head, tag || chain id || last_pos || last_seq ||
/// last_hmac || anchor_pos || anchor_seq || anchor_hmac || key id)`, each field length-prefixed.
fn part_head_mac(key: &[u8; 32], h: &PartHead, key_id: &str) -> Vec<u8> {
    let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(key) else { return Vec::new() };
    for f in [
        PART_HEAD_TAG,
        &h.chain_id.to_be_bytes(),
        &h.last_pos.to_be_bytes(),
        &h.last_seq.to_be_bytes(),
        &h.last_hmac,
        &h.anchor_pos.to_be_bytes(),
        &h.anchor_seq.to_be_bytes(),
        &h.anchor_hmac,
        key_id.as_bytes(),
    ] {
        mac.update(&(f.len() as u32).to_be_bytes());
        mac.update(f);
    }
    mac.finalize().into_bytes().to_vec()
}

fn seal_part_head(key: &[u8; 32], key_id: &str, h: &mut PartHead) {
    h.head_mac = Some(part_head_mac(key, h, key_id));
    h.head_key_id = Some(key_id.to_string());
}

fn check_part_head(keys: &mut ChainKeys<'_>, h: &PartHead) -> Result<(), String> {
    let (Some(key_id), Some(mac)) = (&h.head_key_id, &h.head_mac) else {
        return Err(format!(
            "the head of chain {} carries no MAC (a new chain is sealed at the first start after the \
             upgrade; otherwise only `rewrap` seals it, after checking the chain)",
            h.chain_id
        ));
    };
    let Some(key) = keys.head(key_id) else {
        return Err(format!(
            "the chain head is sealed under key id '{}', which the keyring does not contain",
            key_id.escape_default()
        ));
    };
    if bool::from(part_head_mac(key, h, key_id).ct_eq(mac)) {
        Ok(())
    } else {
        Err("the chain head's MAC does not verify: the head (its last position, seq or HMAC, or its retention \
             anchor) was rewritten without the key, e.g. to hide events removed from the end"
            .into())
    }
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
    /// (chain id, position) of a partition event; `None` for a legacy event (v1 encoding).
    chain: Option<(i64, i64)>,
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
            chain_id: self.chain.map(|c| c.0),
            pos: self.chain.map(|c| c.1),
            chain_key_id,
            hmac,
        }
    }
}

impl<'a> From<&'a ChainedRow> for EventView<'a> {
    fn from(row: &'a ChainedRow) -> Self {
        let r = &row.event;
        Self {
            seq: r.seq,
            chain: row.chain_id.zip(row.pos),
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
/// Legacy events: tag v1, seq, then the fields; partition events: tag v2, seq, chain id,
/// position, then the same fields.
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
    match e.chain {
        None => {
            field(&mut out, Some(CANONICAL_TAG));
            field(&mut out, Some(&e.seq.to_be_bytes()));
        }
        Some((chain, pos)) => {
            field(&mut out, Some(CANONICAL_TAG_V2));
            field(&mut out, Some(&e.seq.to_be_bytes()));
            field(&mut out, Some(&chain.to_be_bytes()));
            field(&mut out, Some(&pos.to_be_bytes()));
        }
    }
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
    /// The chain of that finding (0-255; -1 is the legacy chain of events written before the
    /// partitioned log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad_chain: Option<i64>,
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
        Self {
            ok: true,
            events_checked,
            first_bad_seq: None,
            first_bad_chain: None,
            reason: None,
            purged_through: None,
        }
    }
    fn bad(events_checked: u64, first_bad_seq: Option<i64>, reason: impl Into<String>) -> Self {
        Self {
            ok: false,
            events_checked,
            first_bad_seq,
            first_bad_chain: None,
            reason: Some(reason.into()),
            purged_through: None,
        }
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
    /// Every event from this seq on is re-sealed (the first one under another key, log-wide).
    from_seq: i64,
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
            if seq > head.last_seq && seq != expected {
                return Ok(VerifyReport::bad(
                    checked,
                    Some(seq),
                    format!(
                        "an event at seq {seq} has no chain position and lies beyond the legacy chain's head (seq {})",
                        head.last_seq
                    ),
                )
                .purged(head.anchor_seq));
            }
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
            let view = EventView::from(row);
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
                r.started |= row.chain_key_id != r.key_id || seq >= r.from_seq;
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
        // The first seq after the last event it can vouch for that no event has.
        let seq = store::audit::hole_after(c, head.last_seq.min(last_seq)).await?;
        return Ok(VerifyReport::bad(checked, Some(seq), why).purged(head.anchor_seq));
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
    VerifyReport::bad(0, None, "the legacy chain head (audit_chain row 1) is missing")
}

/// One thing wrong with one chain: the first seq it concerns (when one can be named) and why.
#[derive(Debug, Clone)]
struct Finding {
    seq: Option<i64>,
    chain: i64,
    reason: String,
}

impl Finding {
    /// The earlier of two findings (one with a seq before one without).
    fn earliest(a: Option<Finding>, b: Finding) -> Finding {
        match a {
            None => b,
            Some(a) => match (a.seq, b.seq) {
                (Some(x), Some(y)) if y < x => b,
                (None, Some(_)) => b,
                _ => a,
            },
        }
    }
}

/// Re-sealing of the partition chains in progress.
struct PartReseal<'k> {
    key_id: &'k str,
    key: Zeroizing<[u8; 32]>,
    from_seq: i64,
    count: u64,
    /// Per chain: the new last HMAC (only for chains whose events were re-sealed).
    new_last: HashMap<i64, Vec<u8>>,
}

/// One chain being walked.
struct ChainWalk<'h> {
    head: &'h PartHead,
    prev: Vec<u8>,
    new_prev: Vec<u8>,
    resealing: bool,
    next_pos: i64,
    last_good_seq: i64,
    finding: Option<(i64, String)>,
}

impl<'h> ChainWalk<'h> {
    fn new(head: &'h PartHead) -> Self {
        Self {
            head,
            prev: head.anchor_hmac.clone(),
            new_prev: head.anchor_hmac.clone(),
            resealing: false,
            next_pos: head.anchor_pos + 1,
            last_good_seq: head.anchor_seq,
            finding: None,
        }
    }
}

/// Checks one row of the chain being walked (and re-seals it when asked).
async fn walk_row(
    c: &mut Conn<'_>,
    keys: &mut ChainKeys<'_>,
    w: &mut ChainWalk<'_>,
    row: &ChainedRow,
    reseal: Option<&mut PartReseal<'_>>,
) -> store::Result<()> {
    if w.finding.is_some() {
        return Ok(());
    }
    let (seq, pos) = (row.event.seq, row.pos.unwrap_or(0));
    let chain = w.head.chain_id;
    let bad = if pos <= w.head.anchor_pos {
        Some((
            seq,
            format!(
                "the event at position {pos} of chain {chain} is at or before the chain's retention anchor (position {})",
                w.head.anchor_pos
            ),
        ))
    } else if pos > w.next_pos {
        let hole = store::audit::hole_after(c, w.last_good_seq).await?.min(seq);
        Some((
            hole,
            format!(
                "event seq {hole} is missing (position(s) {}..{} of chain {chain} are gone; the next event there is \
                 seq {seq})",
                w.next_pos,
                pos - 1
            ),
        ))
    } else if pos > w.head.last_pos {
        Some((
            seq,
            format!(
                "the event lies beyond its chain head (position {pos} of chain {chain}; the head records {})",
                w.head.last_pos
            ),
        ))
    } else {
        match keys.get(&row.chain_key_id) {
            None => Some((
                seq,
                format!(
                    "the event is sealed under key id '{}', which the keyring does not contain",
                    row.chain_key_id.escape_default()
                ),
            )),
            Some(key) => {
                let view = EventView::from(row);
                let mac = seal(key, &w.prev, &view, &row.chain_key_id);
                if bool::from(mac.ct_eq(&row.hmac)) {
                    None
                } else {
                    Some((
                        seq,
                        "HMAC mismatch: the event was altered, replaced or moved, or an earlier event was".into(),
                    ))
                }
            }
        }
    };
    if let Some(b) = bad {
        w.finding = Some(b);
        return Ok(());
    }
    if let Some(r) = reseal {
        w.resealing |= row.chain_key_id != r.key_id || seq >= r.from_seq;
        if w.resealing {
            let new = seal(&r.key, &w.new_prev, &EventView::from(row), r.key_id);
            store::audit::reseal(c, seq, r.key_id, &new).await?;
            w.new_prev = new;
            r.count += 1;
            r.new_last.insert(w.head.chain_id, w.new_prev.clone());
        } else {
            w.new_prev.clone_from(&row.hmac);
        }
    }
    w.prev.clone_from(&row.hmac);
    w.next_pos += 1;
    w.last_good_seq = seq;
    Ok(())
}

/// The end of a chain's rows: its head against them (and its MAC).
async fn finish_chain(
    c: &mut Conn<'_>,
    keys: &mut ChainKeys<'_>,
    w: ChainWalk<'_>,
    accept_unsealed: bool,
) -> store::Result<Option<Finding>> {
    let h = w.head;
    let chain = h.chain_id;
    let mut found: Option<Finding> = w.finding.map(|(seq, reason)| Finding { seq: Some(seq), chain, reason });
    match check_part_head(keys, h) {
        Err(_) if accept_unsealed && h.head_mac.is_none() => {}
        Err(why) => {
            let seq = store::audit::hole_after(c, w.last_good_seq).await?;
            found = Some(Finding::earliest(found, Finding { seq: Some(seq), chain, reason: why }));
        }
        Ok(()) => {}
    }
    if found.is_none() {
        let last_pos = w.next_pos - 1;
        if h.last_pos > last_pos {
            let seq = store::audit::hole_after(c, w.last_good_seq).await?.min(h.last_seq.max(w.last_good_seq + 1));
            found = Some(Finding {
                seq: Some(seq),
                chain,
                reason: format!(
                    "event seq {seq} is missing (the head of chain {chain} records {} event(s) but the chain ends at \
                     position {last_pos}: events were removed from the end)",
                    h.last_pos
                ),
            });
        } else if h.last_seq != w.last_good_seq || !bool::from(h.last_hmac.ct_eq(&w.prev)) {
            found = Some(Finding {
                seq: (w.last_good_seq > 0).then_some(w.last_good_seq),
                chain,
                reason: "the chain head's seq or HMAC does not match its last event (the head or the last event \
                         was replaced)"
                    .into(),
            });
        }
    }
    Ok(found)
}

/// Walks every partition chain in (chain, position) order against its head. Returns what was
/// found, per chain at most one finding (the first).
async fn walk_parts(
    c: &mut Conn<'_>,
    keyring: &Keyring,
    heads: &[PartHead],
    mut reseal: Option<&mut PartReseal<'_>>,
    accept_unsealed: bool,
) -> store::Result<Vec<Finding>> {
    let mut keys = ChainKeys::new(keyring);
    let mut findings = Vec::new();
    let by_id: BTreeMap<i64, &PartHead> = heads.iter().map(|h| (h.chain_id, h)).collect();
    for h in heads {
        if !(0..PARTITIONS).contains(&h.chain_id) {
            findings.push(Finding {
                seq: None,
                chain: h.chain_id,
                reason: format!("there is a head for chain {}, which does not exist", h.chain_id),
            });
        }
    }
    let mut done: std::collections::HashSet<i64> = Default::default();
    let mut current: Option<ChainWalk<'_>> = None;
    // Chains with events but no head: named once, at their first event.
    let mut headless: std::collections::HashSet<i64> = Default::default();
    let (mut after_chain, mut after_pos) = (i64::MIN, i64::MIN);
    let mut slow: i64 = 0;
    loop {
        let size = if slow > 0 { 1 } else { PAGE };
        let page = match store::audit::part_page(c, after_chain, after_pos, size).await {
            Ok(p) => p,
            Err(StoreError::Other(_)) if size > 1 => {
                slow = PAGE;
                continue;
            }
            Err(StoreError::Other(e)) => {
                // One row that cannot be decoded: name it, skip the rest of its chain.
                let Some((chain, pos, seq)) = store::audit::part_key_after(c, after_chain, after_pos).await? else {
                    break;
                };
                tracing::warn!(seq, error = %e, "audit event cannot be read");
                let reason = format!("the event at seq {seq} cannot be read (a column holds an invalid value)");
                match current.as_mut() {
                    Some(w) if w.head.chain_id == chain => {
                        if w.finding.is_none() {
                            w.finding = Some((seq, reason));
                        }
                    }
                    _ => findings.push(Finding { seq: Some(seq), chain, reason }),
                }
                (after_chain, after_pos) = (chain, pos);
                slow -= 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        if page.is_empty() {
            break;
        }
        slow = (slow - page.len() as i64).max(0);
        for row in &page {
            let chain = row.chain_id.unwrap_or(i64::MIN);
            (after_chain, after_pos) = (chain, row.pos.unwrap_or(i64::MIN));
            if current.as_ref().is_none_or(|w| w.head.chain_id != chain) {
                if let Some(w) = current.take() {
                    done.insert(w.head.chain_id);
                    findings.extend(finish_chain(c, &mut keys, w, accept_unsealed).await?);
                }
                match by_id.get(&chain) {
                    Some(h) => current = Some(ChainWalk::new(h)),
                    None => {
                        if headless.insert(chain) {
                            findings.push(Finding {
                                seq: Some(row.event.seq),
                                chain,
                                reason: format!("the event is in chain {chain}, whose head is missing"),
                            });
                        }
                        continue;
                    }
                }
            }
            if let Some(w) = current.as_mut() {
                walk_row(c, &mut keys, w, row, reseal.as_deref_mut()).await?;
            }
        }
    }
    if let Some(w) = current.take() {
        done.insert(w.head.chain_id);
        findings.extend(finish_chain(c, &mut keys, w, accept_unsealed).await?);
    }
    for h in heads {
        if !done.contains(&h.chain_id) && (0..PARTITIONS).contains(&h.chain_id) {
            findings.extend(finish_chain(c, &mut keys, ChainWalk::new(h), accept_unsealed).await?);
        }
    }
    for id in 0..PARTITIONS {
        if !by_id.contains_key(&id) && !headless.contains(&id) {
            findings.push(Finding { seq: None, chain: id, reason: format!("the head of chain {id} is missing") });
        }
    }
    Ok(findings)
}

/// The legacy walk's result as a finding.
fn legacy_finding(r: &VerifyReport) -> Option<Finding> {
    (!r.ok).then(|| Finding { seq: r.first_bad_seq, chain: LEGACY_CHAIN, reason: r.reason.clone().unwrap_or_default() })
}

/// The report for everything found: the earliest finding (by seq), the events before it.
async fn combine(
    c: &mut Conn<'_>,
    findings: Vec<Finding>,
    legacy: Option<&ChainHead>,
    heads: &[PartHead],
) -> store::Result<VerifyReport> {
    let anchor = heads.iter().map(|h| h.anchor_seq).chain(legacy.map(|h| h.anchor_seq)).max().unwrap_or(0);
    let first = findings.into_iter().fold(None, |acc, f| Some(Finding::earliest(acc, f)));
    let report = match first {
        None => VerifyReport::good(store::audit::count_below(c, None).await?.max(0) as u64),
        Some(f) => {
            let checked = match f.seq {
                Some(s) => store::audit::count_below(c, Some(s)).await?,
                None => 0,
            };
            let mut r = VerifyReport::bad(checked.max(0) as u64, f.seq, f.reason);
            r.first_bad_chain = Some(f.chain);
            r
        }
    };
    Ok(report.purged(anchor))
}

/// Everything checked in one transaction: the legacy chain, every partition chain, combined.
async fn check_all(
    c: &mut Conn<'_>,
    keyring: &Keyring,
    legacy: Option<&ChainHead>,
    heads: &[PartHead],
    reseal: Option<(&mut Reseal<'_>, &mut PartReseal<'_>)>,
    accept_unsealed: bool,
) -> store::Result<VerifyReport> {
    let (legacy_reseal, part_reseal) = match reseal {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    let mut findings = match legacy {
        None => vec![Finding { seq: None, chain: LEGACY_CHAIN, reason: head_missing().reason.unwrap_or_default() }],
        Some(h) => legacy_finding(&walk(c, keyring, h, legacy_reseal, accept_unsealed).await?).into_iter().collect(),
    };
    findings.extend(walk_parts(c, keyring, heads, part_reseal, accept_unsealed).await?);
    combine(c, findings, legacy, heads).await
}

/// Checks the whole log, as of one consistent snapshot: every chain's events (positions
/// contiguous from its anchor, each HMAC under the key its `chain_key_id` names), every head
/// (its MAC, and against its last event), the legacy chain as before. Names the earliest seq
/// at fault and its chain.
pub async fn verify(db: &Db, keyring: &Keyring) -> store::Result<VerifyReport> {
    let mut snap = Snapshot::begin(db).await?;
    let report = {
        let mut c = snap.conn();
        let legacy = store::audit::read_head(&mut c).await?;
        let heads = store::audit::all_part_heads(&mut c, false).await?;
        check_all(&mut c, keyring, legacy.as_ref(), &heads, None, false).await?
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

/// Verifies the log and re-seals it under the active key, in one write transaction with every
/// head locked (no event is appended meanwhile). Events from the first one (in seq order) sealed
/// under another key on are rewritten, in every chain; every head not under the active key is
/// MACed under it. A log that does not verify is left untouched and reported. Heads not sealed
/// yet are sealed here when the log verifies.
pub async fn reseal(db: &Db, keyring: &Keyring) -> store::Result<ResealReport> {
    let key_id = keyring.active_key_id();
    let derive = || {
        keyring
            .derive(key_id, CHAIN_KEY_LABEL)
            .ok_or_else(|| StoreError::Other("the active key cannot derive the audit chain key".into()))
    };
    let hkey = head_key(keyring, key_id)?;
    let mut tx = db.begin_write().await?;
    let mut c = tx.conn();
    let Some(mut legacy) = store::audit::lock_head(&mut c).await? else {
        return Ok(ResealReport { verified: head_missing(), resealed: 0 });
    };
    let heads = store::audit::all_part_heads(&mut c, true).await?;
    let from_seq = store::audit::min_seq_not_under(&mut c, key_id).await?.unwrap_or(i64::MAX);
    let mut state = Reseal { key_id, key: derive()?, prev: Vec::new(), started: false, count: 0, from_seq };
    let mut parts = PartReseal { key_id, key: derive()?, from_seq, count: 0, new_last: HashMap::new() };
    let verified = check_all(&mut c, keyring, Some(&legacy), &heads, Some((&mut state, &mut parts)), true).await?;
    if !verified.ok {
        // Dropping the transaction rolls back whatever was rewritten before the bad event.
        return Ok(ResealReport { verified, resealed: 0 });
    }
    if state.started || legacy.head_key_id.as_deref() != Some(key_id) || legacy.head_mac.is_none() {
        legacy.last_hmac = state.prev;
        seal_head(&hkey, key_id, &mut legacy);
        store::audit::write_head(&mut c, &legacy).await?;
    }
    let mut changed = Vec::new();
    for mut h in heads {
        let new_last = parts.new_last.remove(&h.chain_id);
        if new_last.is_some() || h.head_key_id.as_deref() != Some(key_id) || h.head_mac.is_none() {
            if let Some(l) = new_last {
                h.last_hmac = l;
            }
            seal_part_head(&hkey, key_id, &mut h);
            changed.push(h);
        }
    }
    store::audit::write_part_heads(&mut c, changed).await?;
    tx.commit().await?;
    Ok(ResealReport { verified, resealed: state.count + parts.count })
}

/// Start-up: refuses a database partitioned otherwise than this build, and seals the heads that
/// carry no MAC yet — the legacy head of a database from before the head MAC, and the untouched
/// heads migration 0008 created — if the whole log verifies. Returns whether it sealed any. A
/// head with events but no MAC is not sealed here (only `rewrap` does, after checking it), and
/// a log that does not verify is left as it is (`verify` keeps reporting it).
pub async fn seal_unsealed_head(db: &Db, keyring: &Keyring) -> store::Result<bool> {
    {
        let mut rc = db.read().await?;
        let mut c = rc.conn();
        match store::audit::recorded_partitions(&mut c).await? {
            Some(PARTITIONS) => {}
            other => {
                return Err(StoreError::Other(format!(
                    "the database records {other:?} audit partitions, this build {PARTITIONS}: refusing to write to it"
                )));
            }
        }
        let legacy_unsealed = store::audit::read_head(&mut c).await?.is_some_and(|h| h.head_mac.is_none());
        let heads = store::audit::all_part_heads(&mut c, false).await?;
        if !legacy_unsealed && heads.iter().all(|h| h.head_mac.is_some()) {
            return Ok(false);
        }
    }
    let key_id = keyring.active_key_id();
    let hkey = head_key(keyring, key_id)?;
    let mut tx = db.begin_write().await?;
    let mut c = tx.conn();
    let Some(mut legacy) = store::audit::lock_head(&mut c).await? else { return Ok(false) };
    let heads = store::audit::all_part_heads(&mut c, true).await?;
    let report = check_all(&mut c, keyring, Some(&legacy), &heads, None, true).await?;
    if !report.ok {
        tracing::warn!(first_bad_seq = ?report.first_bad_seq, first_bad_chain = ?report.first_bad_chain,
            reason = ?report.reason, "the audit log does not verify: its unsealed heads are left without a MAC");
        return Ok(false);
    }
    let mut sealed = 0usize;
    if legacy.head_mac.is_none() {
        seal_head(&hkey, key_id, &mut legacy);
        store::audit::write_head(&mut c, &legacy).await?;
        sealed += 1;
    }
    let mut changed = Vec::new();
    let mut left = 0usize;
    for mut h in heads.into_iter().filter(|h| h.head_mac.is_none()) {
        if h.is_pristine() {
            seal_part_head(&hkey, key_id, &mut h);
            changed.push(h);
        } else {
            left += 1;
        }
    }
    sealed += changed.len();
    store::audit::write_part_heads(&mut c, changed).await?;
    tx.commit().await?;
    if left > 0 {
        tracing::warn!(heads = left, "audit chain heads with events but no MAC are left unsealed (run `rewrap`)");
    }
    tracing::info!(
        heads = sealed,
        events = report.events_checked,
        "audit chain heads sealed (MAC under the active key)"
    );
    Ok(sealed > 0)
}

/// What one retention purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Events removed.
    pub events: u64,
    /// The newest anchor: the last removed seq over all chains.
    pub through_seq: i64,
    /// A due event that does not verify: the purge removed nothing from it on (in seq order),
    /// keeping the evidence.
    pub stopped_at: Option<i64>,
}

/// Events examined per chain per transaction by [`purge_before`].
const PURGE_BATCH: i64 = 2000;

/// What a purge pass found due in one chain: the events it may remove (in order) with their
/// position, seq and HMAC.
struct Due {
    rows: Vec<(i64, i64, Vec<u8>)>,
}

/// Removes, in every chain, the oldest events recorded before `cutoff` (a prefix of each chain),
/// a batch per write transaction that holds the heads of the chains it shortens (their writers
/// wait for it, briefly; nothing is locked when nothing is due). Each
/// event is checked before it goes; at the first one that does not verify (or whose chain head
/// does not), nothing from its seq on is removed in any chain. Each batch moves the anchors of
/// the chains it shortened, re-MACs their heads and records one `audit.purged` event, all in
/// its transaction.
pub async fn purge_before(db: &Db, keyring: &Keyring, cutoff: DateTime<Utc>) -> store::Result<PurgeReport> {
    let key_id = keyring.active_key_id();
    let hkey = head_key(keyring, key_id)?;
    let mut report = PurgeReport::default();
    let mut keys = ChainKeys::new(keyring);
    loop {
        // The look-ahead: which chains have events due among the oldest ones (by seq), so that
        // only their heads are locked (nothing at all when nothing is due).
        let oldest = {
            let mut rc = db.read().await?;
            store::audit::oldest(&mut rc.conn(), PURGE_BATCH).await?
        };
        let more = oldest.len() as i64 == PURGE_BATCH;
        let mut due_ids: Vec<i64> = oldest.iter().filter(|r| r.1 < cutoff).filter_map(|r| r.2).collect();
        due_ids.sort_unstable();
        due_ids.dedup();
        let legacy_has_due = oldest.iter().any(|r| r.1 < cutoff && r.2.is_none());
        // No common lock: the legacy head row is locked only when legacy events are due.
        let mut tx = db.begin_write_for(&[]).await?;
        let mut c = tx.conn();
        let all = store::audit::all_part_heads(&mut c, false).await?;
        let legacy = if legacy_has_due {
            store::audit::lock_head(&mut c).await?
        } else {
            store::audit::read_head(&mut c).await?
        };
        let Some(mut legacy) = legacy else { break };
        report.through_seq = all.iter().map(|h| h.anchor_seq).chain([legacy.anchor_seq]).max().unwrap_or(0);
        if due_ids.is_empty() && !legacy_has_due {
            break;
        }
        let heads = store::audit::lock_part_heads(&mut c, &due_ids).await?;
        let mut stop: Option<i64> = None;
        let mut full = more;
        // The legacy chain (seq order).
        let mut legacy_due: Vec<(i64, Vec<u8>)> = Vec::new();
        if legacy_has_due && check_head(&mut keys, &legacy).is_err() {
            if let Some(first) = store::audit::next_seq(&mut c, legacy.anchor_seq).await? {
                stop = Some(first);
            }
        } else if legacy_has_due {
            let page = store::audit::chain_page(&mut c, legacy.anchor_seq, PURGE_BATCH).await?;
            full |= page.len() as i64 == PURGE_BATCH;
            let mut prev = legacy.anchor_hmac.clone();
            for (expected, row) in (legacy.anchor_seq + 1..).zip(&page) {
                if row.event.at >= cutoff || row.event.seq != expected || row.event.seq > legacy.last_seq {
                    break;
                }
                let ok = keys.get(&row.chain_key_id).is_some_and(|key| {
                    let mac = seal(key, &prev, &EventView::from(row), &row.chain_key_id);
                    bool::from(mac.ct_eq(&row.hmac))
                });
                if !ok {
                    stop = Some(stop.map_or(row.event.seq, |s| s.min(row.event.seq)));
                    break;
                }
                prev.clone_from(&row.hmac);
                legacy_due.push((row.event.seq, row.hmac.clone()));
            }
        }
        // The partition chains.
        let mut due: BTreeMap<i64, Due> = BTreeMap::new();
        for h in &heads {
            let page = store::audit::chain_events(&mut c, h.chain_id, h.anchor_pos, PURGE_BATCH).await?;
            if page.first().is_none_or(|r| r.event.at >= cutoff) {
                continue;
            }
            if check_part_head(&mut keys, h).is_err() {
                let first = page[0].event.seq;
                stop = Some(stop.map_or(first, |s| s.min(first)));
                continue;
            }
            full |= page.len() as i64 == PURGE_BATCH;
            let mut prev = h.anchor_hmac.clone();
            let mut d = Due { rows: Vec::new() };
            for (expected, row) in (h.anchor_pos + 1..).zip(&page) {
                let pos = row.pos.unwrap_or(0);
                if row.event.at >= cutoff || pos != expected || pos > h.last_pos {
                    break;
                }
                let ok = keys.get(&row.chain_key_id).is_some_and(|key| {
                    let mac = seal(key, &prev, &EventView::from(row), &row.chain_key_id);
                    bool::from(mac.ct_eq(&row.hmac))
                });
                if !ok {
                    stop = Some(stop.map_or(row.event.seq, |s| s.min(row.event.seq)));
                    break;
                }
                prev.clone_from(&row.hmac);
                d.rows.push((pos, row.event.seq, row.hmac.clone()));
            }
            if !d.rows.is_empty() {
                due.insert(h.chain_id, d);
            }
        }
        // Nothing at or after a bad event (in seq order) goes, in any chain.
        let limit = stop.unwrap_or(i64::MAX);
        let mut removed: u64 = 0;
        let mut through = report.through_seq;
        legacy_due.retain(|(seq, _)| *seq < limit);
        if let Some((seq, hmac)) = legacy_due.last() {
            removed += store::audit::delete_through(&mut c, *seq).await?;
            legacy.anchor_seq = *seq;
            legacy.anchor_hmac.clone_from(hmac);
            seal_head(&hkey, key_id, &mut legacy);
            store::audit::write_head(&mut c, &legacy).await?;
            through = through.max(*seq);
        }
        let mut changed = Vec::new();
        for mut h in heads {
            let Some(d) = due.get_mut(&h.chain_id) else { continue };
            d.rows.retain(|(_, seq, _)| *seq < limit);
            let Some((pos, seq, hmac)) = d.rows.last() else { continue };
            removed += store::audit::delete_chain_through(&mut c, h.chain_id, *pos).await?;
            h.anchor_pos = *pos;
            h.anchor_seq = *seq;
            h.anchor_hmac.clone_from(hmac);
            through = through.max(*seq);
            seal_part_head(&hkey, key_id, &mut h);
            changed.push(h);
        }
        report.stopped_at = stop;
        if removed == 0 {
            break;
        }
        store::audit::write_part_heads(&mut c, changed).await?;
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
        if report.stopped_at.is_some() || !full {
            break;
        }
    }
    if let Some(seq) = report.stopped_at {
        tracing::warn!(seq, "audit retention purge stopped: the event does not verify, so it is kept");
    }
    Ok(report)
}

// ---- signed checkpoints ---------------------------------------------------------------------

/// One chain's head in a checkpoint: the position, seq and HMAC (hex) of its newest event
/// (chain -1, the legacy chain: its last seq as the position).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointHead {
    pub chain: i64,
    pub pos: i64,
    pub seq: i64,
    pub hmac: String,
}

/// Every chain's head at one instant, signed with Ed25519 under the keyring key `key_id`
/// (`GET /audit/checkpoint`, `centraldb-mfa audit checkpoint`). Kept elsewhere, it lets
/// `audit verify --checkpoint` find events it covers that were later removed, changed or
/// rewound, even with every head rewritten consistently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Checkpoint {
    /// Format version (1).
    pub version: u32,
    /// When the heads were read (RFC 3339, UTC).
    pub at: String,
    /// The keyring key the signing key is derived from; its public key is at
    /// `GET /audit/public-key`.
    pub key_id: String,
    /// The number of partition chains.
    pub partitions: i64,
    pub heads: Vec<CheckpointHead>,
    /// Ed25519 signature (hex) over the checkpoint's canonical encoding (see SECURITY.md).
    pub signature: String,
}

impl Checkpoint {
    /// The signed message: tag, version, at, key id, partitions, then per head chain, pos, seq
    /// and HMAC, each field length-prefixed (u32 big-endian).
    fn message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.heads.len() * 80);
        let mut field = |b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        };
        field(CHECKPOINT_TAG);
        field(&self.version.to_be_bytes());
        field(self.at.as_bytes());
        field(self.key_id.as_bytes());
        field(&self.partitions.to_be_bytes());
        field(&(self.heads.len() as u64).to_be_bytes());
        for h in &self.heads {
            field(&h.chain.to_be_bytes());
            field(&h.pos.to_be_bytes());
            field(&h.seq.to_be_bytes());
            field(h.hmac.as_bytes());
        }
        out
    }
}

/// The Ed25519 key of keyring key `key_id` (its seed derived with [`CHECKPOINT_KEY_LABEL`]).
fn signing_key(keyring: &Keyring, key_id: &str) -> Option<ed25519_dalek::SigningKey> {
    let seed = keyring.derive(key_id, CHECKPOINT_KEY_LABEL)?;
    Some(ed25519_dalek::SigningKey::from_bytes(&seed))
}

/// A checkpoint verification key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PublicKey {
    pub key_id: String,
    /// Always `Ed25519`.
    pub algorithm: String,
    /// The 32-byte public key, hex.
    pub public_key: String,
}

/// The checkpoint public keys of every key in the keyring (the active one first).
pub fn public_keys(keyring: &Keyring) -> Vec<PublicKey> {
    keyring
        .key_ids()
        .into_iter()
        .filter_map(|id| {
            signing_key(keyring, id).map(|k| PublicKey {
                key_id: id.to_string(),
                algorithm: "Ed25519".into(),
                public_key: hex::encode(k.verifying_key().as_bytes()),
            })
        })
        .collect()
}

/// Reads every head in one snapshot and signs them under the active key.
pub async fn checkpoint(db: &Db, keyring: &Keyring) -> store::Result<Checkpoint> {
    let mut snap = Snapshot::begin(db).await?;
    let (legacy, heads) = {
        let mut c = snap.conn();
        (store::audit::read_head(&mut c).await?, store::audit::all_part_heads(&mut c, false).await?)
    };
    snap.end().await?;
    let key_id = keyring.active_key_id();
    let key = signing_key(keyring, key_id)
        .ok_or_else(|| StoreError::Other("the active key cannot derive the checkpoint key".into()))?;
    let mut out = Vec::with_capacity(heads.len() + 1);
    if let Some(l) = legacy.filter(|l| l.last_seq > 0) {
        out.push(CheckpointHead {
            chain: LEGACY_CHAIN,
            pos: l.last_seq,
            seq: l.last_seq,
            hmac: hex::encode(&l.last_hmac),
        });
    }
    out.extend(heads.iter().map(|h| CheckpointHead {
        chain: h.chain_id,
        pos: h.last_pos,
        seq: h.last_seq,
        hmac: hex::encode(&h.last_hmac),
    }));
    let mut cp = Checkpoint {
        version: 1,
        at: store::now().to_rfc3339_opts(SecondsFormat::Micros, true),
        key_id: key_id.to_string(),
        partitions: PARTITIONS,
        heads: out,
        signature: String::new(),
    };
    use ed25519_dalek::Signer;
    cp.signature = hex::encode(key.sign(&cp.message()).to_bytes());
    Ok(cp)
}

/// Checks a checkpoint's signature, then the log ([`verify`]), then every head the checkpoint
/// holds against the rows: the event it names must still be there with the same seq and HMAC
/// (or have been purged by retention, the chain's anchor at or past it). Names the chain and
/// the checkpoint's seq of the first chain found removed, changed or rewound.
pub async fn verify_checkpoint(db: &Db, keyring: &Keyring, cp: &Checkpoint) -> store::Result<VerifyReport> {
    let Some(key) = signing_key(keyring, &cp.key_id) else {
        return Ok(VerifyReport::bad(
            0,
            None,
            format!(
                "the checkpoint is signed under key id '{}', which the keyring does not contain",
                cp.key_id.escape_default()
            ),
        ));
    };
    let sig = hex::decode(&cp.signature)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
        .map(|b| ed25519_dalek::Signature::from_bytes(&b));
    let signed = sig.is_some_and(|s| key.verifying_key().verify_strict(&cp.message(), &s).is_ok());
    if !signed || cp.version != 1 {
        return Ok(VerifyReport::bad(0, None, "the checkpoint's signature does not verify (it was altered or forged)"));
    }
    if cp.partitions != PARTITIONS {
        return Ok(VerifyReport::bad(
            0,
            None,
            format!("the checkpoint has {} partitions, the log {PARTITIONS}", cp.partitions),
        ));
    }
    let report = verify(db, keyring).await?;
    if !report.ok {
        return Ok(report);
    }
    let mut snap = Snapshot::begin(db).await?;
    let mut found: Option<Finding> = None;
    {
        let mut c = snap.conn();
        let legacy = store::audit::read_head(&mut c).await?;
        let heads: HashMap<i64, PartHead> =
            store::audit::all_part_heads(&mut c, false).await?.into_iter().map(|h| (h.chain_id, h)).collect();
        for h in cp.heads.iter().filter(|h| h.pos > 0) {
            let (anchor_pos, anchor_seq, anchor_hmac) = if h.chain == LEGACY_CHAIN {
                match &legacy {
                    Some(l) => (l.anchor_seq, l.anchor_seq, l.anchor_hmac.clone()),
                    None => (0, 0, Vec::new()),
                }
            } else {
                match heads.get(&h.chain) {
                    Some(p) => (p.anchor_pos, p.anchor_seq, p.anchor_hmac.clone()),
                    None => (0, 0, Vec::new()),
                }
            };
            let problem = if anchor_pos > h.pos {
                None // purged by retention since
            } else if anchor_pos == h.pos {
                (anchor_seq != h.seq || hex::encode(&anchor_hmac) != h.hmac)
                    .then(|| "was changed since the checkpoint (the retention anchor differs)".to_string())
            } else {
                match store::audit::event_at(&mut c, h.chain, h.pos).await? {
                    None => Some("is gone: the chain was truncated or rewound since the checkpoint".to_string()),
                    Some((seq, hmac)) if seq != h.seq || hex::encode(&hmac) != h.hmac => {
                        Some("was changed since the checkpoint (its seq or HMAC differs)".to_string())
                    }
                    Some(_) => None,
                }
            };
            if let Some(p) = problem {
                let reason = format!(
                    "the event at position {} of chain {} (seq {}), covered by the checkpoint of {}, {p}",
                    h.pos, h.chain, h.seq, cp.at
                );
                found = Some(Finding::earliest(found, Finding { seq: Some(h.seq), chain: h.chain, reason }));
            }
        }
    }
    snap.end().await?;
    Ok(match found {
        None => report,
        Some(f) => {
            let mut r = VerifyReport::bad(report.events_checked, f.seq, f.reason);
            r.first_bad_chain = Some(f.chain);
            r.purged_through = report.purged_through;
            r
        }
    })
}

/// One audit event. Never holds a token, code, hash, key or resume state.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEvent {
    /// Position in the log: 1, 2, 3, ... without gaps.
    pub seq: i64,
    pub id: Uuid,
    pub at: DateTime<Utc>,
    /// What happened, e.g. `token.write`, `token.read`, `auth.denied`, `key.rewrap`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `success`, `failure`, `denied` or `error`.
    pub outcome: String,
    pub user_id: Option<String>,
    /// `key:<api key id>`, or `cli`.
    pub actor: Option<String>,
    pub request_id: Option<String>,
    pub source_ip: Option<String>,
    /// Non-secret facts about the act (see the README's event table).
    #[schema(value_type = Object)]
    pub details: Value,
}

impl From<AuditRow> for AuditEvent {
    fn from(r: AuditRow) -> Self {
        // Stored as JSON text by the service; shown as a string if it no longer parses.
        let details = serde_json::from_str(&r.details).unwrap_or(Value::String(r.details));
        Self {
            seq: r.seq,
            id: r.id,
            at: r.at,
            type_: r.type_,
            outcome: r.outcome,
            user_id: r.user_id,
            actor: r.actor,
            request_id: r.request_id,
            source_ip: r.source_ip,
            details,
        }
    }
}

/// What `GET /audit/events` asks for; `None` filters match everything.
#[derive(Debug)]
pub struct EventQuery<'a> {
    /// Only events with a `seq` above this.
    pub after: i64,
    pub user: Option<&'a crate::domain::UserId>,
    pub type_: Option<&'a str>,
    pub outcome: Option<Outcome>,
    /// Inclusive.
    pub since: Option<DateTime<Utc>>,
    /// Exclusive.
    pub until: Option<DateTime<Utc>>,
    pub limit: i64,
}

/// A page of events, oldest first (`GET /audit/events`). Reading is not audited.
pub async fn events(db: &Db, q: &EventQuery<'_>) -> store::Result<Vec<AuditEvent>> {
    let filter = EventFilter {
        after: q.after,
        user_id: q.user.map(crate::domain::UserId::as_str),
        type_: q.type_,
        outcome: q.outcome.map(Outcome::as_str),
        since: q.since,
        until: q.until,
        limit: q.limit,
    };
    let mut c = db.read().await?;
    Ok(store::audit::query(&mut c.conn(), &filter).await?.into_iter().map(AuditEvent::from).collect())
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
            chain: None,
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
                chain: None,
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
