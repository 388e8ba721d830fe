//! `Idempotency-Key` records: the claim a keyed write takes before it acts, the answer kept for
//! its retries, and the purge of records past their TTL.
//!
//! Claim, finish and release are each one conditional statement on the key's own row, with no
//! audit event, each in its own short transaction: they take no lock beyond that row
//! (`Db::begin_write_for(&[])`), so the requests of different users that carry an
//! `Idempotency-Key` don't queue on the common write lock. The record is not written in the
//! act's own transaction: an instance that dies between the two leaves a `running` row whose
//! lease lapses, after which a retry acts again. The HTTP side (fingerprints, what is kept, the
//! replayed answer) is the API's idempotency layer; this module only keeps the records.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    services::error::ServiceError,
    store::{self, Db, StoreError, idempotency as records},
};

/// Records deleted per purge transaction.
const PURGE_BATCH: i64 = 1000;
/// Purge transactions per sweeper pass at most (the rest waits for the next pass).
const PURGE_BATCHES: usize = 10;

/// A claim on a key: who claims it (`owner`, one per request), for which request, until when.
pub struct Claim {
    pub api_key_id: Uuid,
    /// SHA-256 of the `Idempotency-Key`.
    pub key_hash: Vec<u8>,
    /// The request's fingerprint, keyed under keyring key `hash_key_id`.
    pub request_hash: Vec<u8>,
    pub hash_key_id: String,
    pub owner: Uuid,
    /// The `running` claim's lease: past it, a retry may claim the key again.
    pub locked_until: DateTime<Utc>,
    /// When the record (and its kept answer) may be purged.
    pub expires_at: DateTime<Utc>,
}

impl Claim {
    /// A claim taken now by a new owner, its lease `lease` long and its record kept for `ttl`.
    pub fn new(
        api_key_id: Uuid,
        key_hash: Vec<u8>,
        request_hash: Vec<u8>,
        hash_key_id: String,
        lease: Duration,
        ttl: Duration,
    ) -> Self {
        let now = store::now();
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(1));
        Self {
            api_key_id,
            key_hash,
            request_hash,
            hash_key_id,
            owner: Uuid::now_v7(),
            locked_until: now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(30)),
            expires_at: now + ttl,
        }
    }
}

/// The record of a key, as a retry sees it.
pub struct Record {
    pub request_hash: Vec<u8>,
    pub hash_key_id: String,
    /// The kept answer (an envelope) once the first request is done; `None` while it runs.
    pub answer: Option<Vec<u8>>,
}

/// Inserts a `running` record owned by `claim.owner`, or takes over one that has expired or whose
/// `running` lease lapsed (its instance died). `false` when a live record holds the key.
pub async fn claim(db: &Db, claim: &Claim) -> Result<bool, ServiceError> {
    let c = records::Claim {
        api_key_id: claim.api_key_id,
        key_hash: &claim.key_hash,
        request_hash: &claim.request_hash,
        hash_key_id: &claim.hash_key_id,
        owner: claim.owner,
        locked_until: claim.locked_until,
        expires_at: claim.expires_at,
    };
    let mut tx = db.begin_write_for(&[]).await?;
    let won = records::claim(&mut tx.conn(), &c, store::now()).await?;
    tx.commit().await?;
    Ok(won)
}

/// The record of a key, if any (read outside any write transaction).
pub async fn get(db: &Db, api_key_id: Uuid, key_hash: &[u8]) -> Result<Option<Record>, ServiceError> {
    let mut rc = db.read().await?;
    let row = records::get(&mut rc.conn(), api_key_id, key_hash).await?;
    Ok(row.map(|row| Record {
        request_hash: row.request_hash,
        hash_key_id: row.hash_key_id,
        answer: if row.state == "done" { row.response } else { None },
    }))
}

/// Keeps the answer (an envelope) of the claim `owner` holds. `false` when the claim was lost
/// meanwhile.
pub async fn finish(
    db: &Db,
    api_key_id: Uuid,
    key_hash: &[u8],
    owner: Uuid,
    answer: &[u8],
) -> Result<bool, ServiceError> {
    let mut tx = db.begin_write_for(&[]).await?;
    let kept = records::finish(&mut tx.conn(), api_key_id, key_hash, owner, answer).await?;
    tx.commit().await?;
    Ok(kept)
}

/// Drops the claim `owner` holds (the request did not end with an answer worth keeping).
/// `false` when it was no longer held.
pub async fn release(db: &Db, api_key_id: Uuid, key_hash: &[u8], owner: Uuid) -> Result<bool, ServiceError> {
    let mut tx = db.begin_write_for(&[]).await?;
    let dropped = records::release(&mut tx.conn(), api_key_id, key_hash, owner).await?;
    tx.commit().await?;
    Ok(dropped)
}

/// Deletes records past their TTL at `now`: at most `PURGE_BATCHES` batches of `PURGE_BATCH` per
/// call (the rest waits for the next sweeper pass), each its own short transaction under the
/// common write lock. They hold no secret in the clear and are no audit matter, so nothing is
/// audited. Returns how many were deleted (the sweeper logs it).
pub async fn purge_expired(db: &Db, now: DateTime<Utc>) -> Result<u64, StoreError> {
    let mut total = 0;
    for _ in 0..PURGE_BATCHES {
        let mut tx = db.begin_write().await?;
        let n = records::purge_expired(&mut tx.conn(), now, PURGE_BATCH).await?;
        tx.commit().await?;
        total += n;
        if n < PURGE_BATCH as u64 {
            break;
        }
    }
    Ok(total)
}
