//! Refresh leases: exactly one GarminSync worker refreshes a user's tokens while the others wait
//! for its result.
//!
//! A lease carries a fence that only grows per user. A write presenting a fence is accepted only
//! while that fence is the live lease (so a worker whose lease lapsed and was granted to another
//! can never overwrite the newer tokens), and releases it. Waiting workers long-poll for a newer
//! version: woken in-process by a broadcast, across processes by PostgreSQL LISTEN/NOTIFY (or,
//! on SQLite, by a modest poll).

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{Semaphore, broadcast, watch};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    crypto::Keyring,
    domain::UserId,
    services::{
        audit::{self, AuditContext, Outcome},
        error::{BusyCause, Missing, ServiceError},
    },
    store::{self, Db, leases::LeaseRow},
};

pub const DEFAULT_TTL_SECS: i64 = 30;
pub const MAX_TTL_SECS: i64 = 300;
pub const MAX_WAIT_SECS: u64 = 30;

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LeaseView {
    pub lease_id: Uuid,
    /// Grows with every lease granted for this user; present it as `X-Lease-Fence`.
    pub fence: i64,
    pub holder: String,
    pub expires_at: DateTime<Utc>,
    /// The stored bundle's version when the lease was granted.
    pub version: i64,
}

impl LeaseView {
    fn from_row(r: &LeaseRow, version: i64) -> Option<Self> {
        Some(Self {
            lease_id: r.lease_id?,
            fence: r.fence,
            holder: r.holder.clone()?,
            expires_at: r.expires_at?,
            version,
        })
    }
}

/// The refusal of a write or acquisition while another holder's lease is live.
pub fn lease_held(l: &LeaseRow, now: DateTime<Utc>) -> ServiceError {
    let retry_after_secs = l.expires_at.map(|e| (e - now).num_seconds().max(1) as u64).unwrap_or(1);
    ServiceError::LeaseHeld { holder: l.holder.clone().unwrap_or_default(), expires_at: l.expires_at, retry_after_secs }
}

pub fn lease_lost() -> ServiceError {
    ServiceError::LeaseLost
}

/// How a long-poll wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// Read the bundle now (a newer version, or no usable bundle: 404/410).
    Read,
    /// Nothing newer: 304 with this stored version as the `ETag`.
    NotModified(i64),
}

/// Announces new bundle versions to long-polling readers, and bounds how many may wait.
#[derive(Clone)]
pub struct VersionNotifier {
    tx: broadcast::Sender<(Arc<str>, i64)>,
    waiters: Arc<Semaphore>,
    closing: watch::Sender<bool>,
}

impl VersionNotifier {
    pub fn new(max_waiters: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let (closing, _) = watch::channel(false);
        Self { tx, waiters: Arc::new(Semaphore::new(max_waiters)), closing }
    }

    /// Readers subscribed to new versions right now: each long-poll between the moment it starts
    /// waiting and its answer (a diagnostic; tests use it to know a waiter waits before a write).
    pub fn waiting(&self) -> usize {
        self.tx.receiver_count()
    }

    pub fn publish(&self, user: &str, version: i64) {
        let _ = self.tx.send((Arc::from(user), version));
    }

    /// Ends every wait now (shutdown): waiters answer 304 at once.
    pub fn close(&self) {
        let _ = self.closing.send(true);
    }

    /// Waits until the stored version of `user` is above `newer_than`, or `wait` passes.
    /// [`Waited::Read`] when the caller should read the bundle now: a newer version is there, or
    /// there is no usable bundle (missing, invalidated, past its refresh expiry: the read answers
    /// 404 or 410 at once, also when that happens while the caller waits).
    /// [`Waited::NotModified`] carries the stored version.
    pub async fn wait_newer(
        &self,
        db: &Db,
        user: &UserId,
        newer_than: i64,
        wait: Duration,
    ) -> Result<Waited, ServiceError> {
        let current = || async {
            let mut rc = db.read().await?;
            let row = store::tokens::get(&mut rc.conn(), user.as_str()).await?;
            let now = store::now();
            Ok::<_, ServiceError>(match row {
                Some(r) if r.version > newer_than => Waited::Read,
                Some(r)
                    if crate::services::token_status::status_of(&r, now).0
                        != crate::services::token_status::TokenStatus::ReauthRequired =>
                {
                    Waited::NotModified(r.version)
                }
                _ => Waited::Read,
            })
        };
        if wait.is_zero() {
            return current().await;
        }
        let _permit =
            self.waiters.clone().try_acquire_owned().map_err(|_| ServiceError::Busy(BusyCause::VersionWaiters))?;
        // Subscribe before reading, so a version written in between is not missed.
        let mut rx = self.tx.subscribe();
        let mut closing = self.closing.subscribe();
        let mut seen = current().await?;
        if *closing.borrow() || seen == Waited::Read {
            return Ok(seen);
        }
        // Another process may write (SQLite has no NOTIFY; a PostgreSQL listener may reconnect):
        // re-read now and then.
        let poll = store::notify::recheck_interval(db);
        let deadline = tokio::time::Instant::now() + wait;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
        loop {
            let recheck = tokio::select! {
                () = tokio::time::sleep_until(deadline) => return current().await,
                _ = closing.changed() => return Ok(seen),
                msg = rx.recv() => match msg {
                    // A newer version was announced: read it (the announcement is trusted).
                    Ok((u, v)) if &*u == user.as_str() && v > newer_than => return Ok(Waited::Read),
                    // Another change of this user's bundle (a delete announces the version it
                    // removed): look whether a usable bundle is still there.
                    Ok((u, _)) => &*u == user.as_str(),
                    Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => return Ok(seen),
                },
                _ = ticker.tick() => true,
            };
            if recheck {
                seen = current().await?;
                if seen == Waited::Read {
                    return Ok(seen);
                }
            }
        }
    }

    /// On PostgreSQL: forwards the versions other processes announce to local waiters,
    /// reconnecting as needed, until `stop` resolves. Returns at once on SQLite.
    pub async fn listen_postgres(self, db: Db, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let listener = async {
                let Some(mut l) = store::notify::Listener::connect(&db).await? else {
                    return Ok::<(), store::StoreError>(());
                };
                loop {
                    let (user, version) = l.recv().await?;
                    self.publish(&user, version);
                }
            };
            tokio::select! {
                () = &mut stop => return,
                r = listener => match r {
                    // SQLite: no channel to listen on.
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "version listener lost its connection; reconnecting");
                    }
                },
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

#[derive(Clone)]
pub struct Leases {
    db: Db,
    keyring: Arc<Keyring>,
}

impl Leases {
    pub fn new(db: Db, keyring: Arc<Keyring>) -> Self {
        Self { db, keyring }
    }

    /// Grants a lease, or gives the same holder its live lease back (extended, never shortened).
    /// `true` when new. A bundle that needs a new login (invalidated, destroyed, past its refresh
    /// expiry) gets none.
    pub async fn acquire(
        &self,
        ctx: &AuditContext,
        user: &UserId,
        holder: &str,
        ttl_secs: i64,
    ) -> Result<(LeaseView, bool), ServiceError> {
        let now = store::now();
        let expires_at = now + chrono::Duration::seconds(ttl_secs);
        let u = user.as_str();
        let mut tx = self.db.begin_write_for(&[u]).await?;
        let mut c = tx.conn();
        // Nothing to refresh: no bundle (404), or one that needs a new login (410).
        let bundle = store::tokens::get(&mut c, u).await?.ok_or(ServiceError::NotFound(Missing::Tokens))?;
        if let (crate::services::token_status::TokenStatus::ReauthRequired, reason) =
            crate::services::token_status::status_of(&bundle, now)
        {
            return Err(ServiceError::ReauthRequired { reason: reason.unwrap_or_else(|| "destroyed".into()) });
        }
        let version = bundle.version;
        let renewed = store::leases::renew(&mut c, u, holder, expires_at, now).await?;
        let (row, created, event) = match renewed {
            Some(r) => (r, false, "lease.renewed"),
            None => match store::leases::grant(&mut c, u, Uuid::now_v7(), holder, expires_at, now).await? {
                Some(r) => (r, true, "lease.granted"),
                None => {
                    let live = store::leases::live(&mut c, u, now).await?;
                    audit::record(
                        &mut c,
                        &self.keyring,
                        ctx,
                        "lease.refused",
                        Outcome::Denied,
                        Some(u),
                        json!({"holder": holder, "held_by": live.as_ref().and_then(|l| l.holder.clone())}),
                    )
                    .await?;
                    tx.commit().await?;
                    crate::telemetry::lease_event("refused");
                    return Err(live.map(|l| lease_held(&l, now)).unwrap_or_else(lease_lost));
                }
            },
        };
        audit::record(
            &mut c,
            &self.keyring,
            ctx,
            event,
            Outcome::Success,
            Some(u),
            json!({"holder": holder, "fence": row.fence, "ttl_seconds": ttl_secs}),
        )
        .await?;
        tx.commit().await?;
        crate::telemetry::lease_event(if created { "granted" } else { "renewed" });
        let view =
            LeaseView::from_row(&row, version).ok_or_else(|| ServiceError::Internal("lease row incomplete".into()))?;
        Ok((view, created))
    }

    /// Ends the lease with this fence early.
    pub async fn release(&self, ctx: &AuditContext, user: &UserId, fence: i64) -> Result<(), ServiceError> {
        let now = store::now();
        let mut tx = self.db.begin_write_for(&[user.as_str()]).await?;
        let mut c = tx.conn();
        let done = store::leases::release(&mut c, user.as_str(), fence, now).await?;
        let (event, outcome) =
            if done.is_some() { ("lease.released", Outcome::Success) } else { ("lease.lost", Outcome::Failure) };
        audit::record(&mut c, &self.keyring, ctx, event, outcome, Some(user.as_str()), json!({"fence": fence})).await?;
        tx.commit().await?;
        crate::telemetry::lease_event(if done.is_some() { "released" } else { "lost" });
        done.map(|_| ()).ok_or_else(lease_lost)
    }
}

impl Leases {
    /// Ends every lease past its expiry at `now` (`lease.expired`; the fence is kept, so a late
    /// write with it is still refused). Read in batches of `batch`; each lease is its own
    /// transaction under its user's lock, and ends only if it is still the same lease (fence)
    /// and still lapsed. Returns how many leases expired.
    pub async fn expire_due(&self, ctx: &AuditContext, now: DateTime<Utc>, batch: i64) -> store::Result<u64> {
        let mut expired = 0;
        loop {
            let lapsed = {
                let mut rc = self.db.read().await?;
                store::leases::due_for_expiry(&mut rc.conn(), now, batch).await?
            };
            for l in &lapsed {
                let mut tx = self.db.begin_write_for(&[l.user_id.as_str()]).await?;
                let mut c = tx.conn();
                if store::leases::expire(&mut c, &l.user_id, l.fence, now).await? {
                    expired += 1;
                    audit::record(
                        &mut c,
                        &self.keyring,
                        ctx,
                        "lease.expired",
                        Outcome::Success,
                        Some(l.user_id.as_str()),
                        json!({"fence": l.fence, "holder": l.holder}),
                    )
                    .await?;
                }
                tx.commit().await?;
            }
            if (lapsed.len() as i64) < batch {
                return Ok(expired);
            }
        }
    }
}
