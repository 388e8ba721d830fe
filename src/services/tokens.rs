//! The token vault: encrypt, store, read back, invalidate and delete bundles, each act audited
//! in its own transaction (if the audit row cannot be written, the act does not happen).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;
use uuid::Uuid;

pub use super::token_status::TokenStatus;

use crate::{
    crypto::{Aad, Keyring},
    domain::{BundleKind, TokenBundle, UserId, tokens::secrets_from_plaintext},
    services::audit::{self, AuditContext, Outcome},
    services::error::{Missing, ServiceError},
    services::group_commit::{Decision, ReadAudit},
    services::leases,
    services::token_status::status_of,
    store::{
        self, Conn, Db, StoreError,
        tokens::{BundleRow, BundleWithSecret, NewBundle, WriteCondition},
    },
};

/// A bundle's metadata: never a secret.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenMetadata {
    pub user_id: String,
    /// `garth` or `garminconnect`.
    pub kind: String,
    /// Starts at 1, +1 per write; the compare-and-set handle (`ETag`, `If-Match`).
    pub version: i64,
    pub status: TokenStatus,
    pub access_expires_at: Option<DateTime<Utc>>,
    pub refresh_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    /// False when the bundle cannot be refreshed (a garminconnect login without
    /// `di_refresh_token`: it ends at `access_expires_at`). Given on writes and decrypting reads;
    /// the metadata-only read (no decryption) omits it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refreshable: Option<bool>,
    /// Why the bundle needs a new login (`invalidate` reason, `refresh_expired`), when it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reauth_reason: Option<String>,
}

impl TokenMetadata {
    pub fn from_row(row: &BundleRow, now: DateTime<Utc>) -> Self {
        let (status, reauth_reason) = status_of(row, now);
        Self {
            user_id: row.user_id.clone(),
            kind: row.kind.clone(),
            version: row.version,
            status,
            access_expires_at: row.access_expires_at,
            refresh_expires_at: row.refresh_expires_at,
            created_at: row.created_at,
            updated_at: row.updated_at,
            last_used_at: row.last_used_at,
            refreshable: None,
            reauth_reason,
        }
    }
}

/// The decision of a decrypting read on the row it found: the answer and its audit record.
fn open_bundle(
    keyring: &Keyring,
    found: Option<BundleWithSecret>,
    require_kind: Option<BundleKind>,
    now: DateTime<Utc>,
) -> (Decision, Result<OpenedBundle, ServiceError>) {
    let record = |outcome: Outcome, details: Value, touch: Option<DateTime<Utc>>| Decision {
        type_: "token.read",
        outcome,
        details,
        touch,
    };
    let fail = |reason: &str| record(Outcome::Failure, json!({"reason": reason}), None);
    let Some(b) = found else {
        return (fail("not_found"), Err(ServiceError::NotFound(Missing::Tokens)));
    };
    let (status, reason) = status_of(&b.row, now);
    let (TokenStatus::Valid | TokenStatus::AccessExpired, Some(ciphertext)) = (status, b.ciphertext.as_deref()) else {
        let reason = reason.unwrap_or_else(|| "destroyed".into());
        return (fail(&reason), Err(ServiceError::ReauthRequired { reason }));
    };
    if let Some(kind) = require_kind.filter(|k| k.as_str() != b.row.kind) {
        let refusal = ServiceError::field(
            "representation",
            format!("this representation is only available for {} bundles", kind.as_str()),
        );
        return (fail("representation_unavailable"), Err(refusal));
    }
    // Only the per-write binding is accepted here. A legacy row (no write id) is upgraded at
    // start-up or by `rewrap`, never read as is: else anyone able to edit the row could put back
    // an older legacy ciphertext and clear the write id.
    let opened = b
        .row
        .write_id
        .ok_or_else(|| "legacy envelope (not upgraded; run `centraldb-mfa rewrap`)".to_string())
        .and_then(|write_id| {
            let aad = Aad::token_bundle_write(&b.row.user_id, &b.row.kind, b.row.version, &write_id.to_string());
            keyring.decrypt(ciphertext, &aad).map_err(|e| e.to_string())
        })
        .and_then(|plain| secrets_from_plaintext(&plain));
    match opened {
        Ok(secrets) => {
            let decision = record(Outcome::Success, json!({"kind": b.row.kind, "version": b.row.version}), Some(now));
            let mut metadata = TokenMetadata::from_row(&b.row, now);
            metadata.last_used_at = Some(now);
            metadata.refreshable = Some(crate::domain::tokens::refreshable(&secrets));
            (decision, Ok(OpenedBundle { metadata, secrets }))
        }
        Err(error) => {
            let details = json!({"reason": "decrypt_failed", "key_id": b.row.key_id, "error": error});
            (record(Outcome::Error, details, None), Err(ServiceError::DecryptFailed))
        }
    }
}

/// What a write requires of the stored bundle (the API's `If-Match` / `If-None-Match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// The stored version must equal this.
    VersionIs(i64),
    /// A bundle must exist.
    Exists,
    /// No usable bundle may exist.
    Absent,
}

impl From<Precondition> for WriteCondition {
    fn from(p: Precondition) -> Self {
        match p {
            Precondition::None => Self::None,
            Precondition::VersionIs(v) => Self::VersionIs(v),
            Precondition::Exists => Self::Exists,
            Precondition::Absent => Self::Absent,
        }
    }
}

/// A decrypted bundle: metadata plus the secret fields exactly as stored.
pub struct OpenedBundle {
    pub metadata: TokenMetadata,
    pub secrets: Map<String, Value>,
}

#[derive(Clone)]
pub struct Vault {
    db: Db,
    keyring: Arc<Keyring>,
    notifier: crate::services::leases::VersionNotifier,
    reads: ReadAudit,
}

impl Vault {
    pub fn new(db: Db, keyring: Arc<Keyring>, notifier: crate::services::leases::VersionNotifier) -> Self {
        let reads = ReadAudit::start(db.clone(), keyring.clone());
        Self { db, keyring, notifier, reads }
    }

    /// Stores a bundle if `cond` holds. Returns its metadata and whether it was created.
    pub async fn put(
        &self,
        ctx: &AuditContext,
        user: &UserId,
        bundle: TokenBundle,
        cond: Precondition,
        fence: Option<i64>,
    ) -> Result<(TokenMetadata, bool), ServiceError> {
        let kind = bundle.kind.as_str();
        let now = store::now();
        let mut tx = self.db.begin_write_for(&[user.as_str()]).await?;
        let mut refused = Map::new();
        refused.insert("kind".into(), json!(kind));
        if let Some(refusal) =
            self.lease_refusal(&mut tx.conn(), ctx, user.as_str(), fence, "token.write", refused, "reason", now).await?
        {
            tx.commit().await?;
            return Err(refusal);
        }
        // The ciphertext is bound to the version this write creates and to a fresh write id, so
        // it is encrypted here, under the write lock (writers of this user are serialised: the stored version
        // cannot move meanwhile; AES-GCM of a bundle takes microseconds).
        let current = store::tokens::get(&mut tx.conn(), user.as_str()).await?;
        let next_version = current.as_ref().map_or(1, |r| r.version + 1);
        let write_id = Uuid::new_v4();
        let aad = Aad::token_bundle_write(user.as_str(), kind, next_version, &write_id.to_string());
        let ciphertext = self.keyring.encrypt(&bundle.plaintext, &aad);
        let new = NewBundle {
            user_id: user.as_str(),
            kind,
            key_id: self.keyring.active_key_id(),
            ciphertext: &ciphertext,
            write_id,
            access_expires_at: bundle.access_expires_at,
            refresh_expires_at: bundle.refresh_expires_at,
            now,
        };
        match store::tokens::write(&mut tx.conn(), &new, cond.into()).await? {
            // Unreachable while writers of this user are serialised; dropped, `tx` rolls the write back.
            Some((row, _)) if row.version != next_version => {
                Err(ServiceError::Internal("the stored version moved during a write".into()))
            }
            Some((row, created)) => {
                self.consume_lease(&mut tx.conn(), ctx, user.as_str(), fence, row.version, "write", now).await?;
                store::notify::announce(&mut tx.conn(), user.as_str(), row.version).await?;
                let mut meta = TokenMetadata::from_row(&row, now);
                meta.refreshable = Some(bundle.refreshable);
                audit::record(
                    &mut tx.conn(),
                    &self.keyring,
                    ctx,
                    "token.write",
                    Outcome::Success,
                    Some(user.as_str()),
                    json!({"kind": kind, "version": row.version, "created": created,
                           "key_id": new.key_id, "status": meta.status}),
                )
                .await?;
                tx.commit().await?;
                self.notifier.publish(user.as_str(), row.version);
                Ok((meta, created))
            }
            None => {
                let current_version = current.as_ref().map(|r| r.version);
                let details = json!({"kind": kind, "reason": "version_conflict", "current_version": current_version,
                                     "expected_version": expected_version(cond)});
                audit::record(
                    &mut tx.conn(),
                    &self.keyring,
                    ctx,
                    "token.write",
                    Outcome::Failure,
                    Some(user.as_str()),
                    details,
                )
                .await?;
                tx.commit().await?;
                Err(conflict(cond, current.as_ref()))
            }
        }
    }

    /// Decrypts and returns a bundle; refuses one that needs a new login, or (with
    /// `require_kind`) one of another kind, before decrypting anything. The row is read, and the
    /// audit row (and `last_used_at`) written, in a batch of reads (`group_commit`); the answer
    /// leaves only after that batch commits.
    pub async fn get(
        &self,
        ctx: &AuditContext,
        user: &UserId,
        require_kind: Option<BundleKind>,
    ) -> Result<OpenedBundle, ServiceError> {
        let now = store::now();
        let keyring = self.keyring.clone();
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.reads
            .read(ctx.clone(), user.as_str().to_string(), move |found| {
                let (decision, result) = open_bundle(&keyring, found, require_kind, now);
                let _ = answer.send(result);
                decision
            })
            .await?;
        answered.await.map_err(|_| ServiceError::from(StoreError::Other("a read was not answered".into())))?
    }

    /// Metadata only, no decryption. `event` names the audit type (`token.metadata_read`,
    /// `auth_status.read`).
    pub async fn metadata(
        &self,
        ctx: &AuditContext,
        user: &UserId,
        event: &'static str,
    ) -> Result<Option<TokenMetadata>, ServiceError> {
        let now = store::now();
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.reads
            .read(ctx.clone(), user.as_str().to_string(), move |found| {
                let meta = found.map(|b| TokenMetadata::from_row(&b.row, now));
                let details = json!({"found": meta.is_some(), "status": meta.as_ref().map(|m| m.status)});
                let _ = answer.send(meta);
                Decision { type_: event, outcome: Outcome::Success, details, touch: None }
            })
            .await?;
        answered.await.map_err(|_| ServiceError::from(StoreError::Other("a read was not answered".into())))
    }

    /// The refresh-lease rule of every act that changes a bundle (write, invalidate, delete): a
    /// request carrying a fence must hold the user's live lease (else `lease_lost`); one without
    /// must not race another holder's live lease (else `lease_held`). A refusal is audited in
    /// `c`'s transaction (`lease.lost`, or `event` with `key` = `lease_held`), and returned for
    /// the caller to commit and answer. Writers of the user are serialised, so check-then-act is safe.
    #[allow(clippy::too_many_arguments)]
    async fn lease_refusal(
        &self,
        c: &mut Conn<'_>,
        ctx: &AuditContext,
        user: &str,
        fence: Option<i64>,
        event: &'static str,
        mut details: Map<String, Value>,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ServiceError>, ServiceError> {
        let live = store::leases::live(c, user, now).await?;
        let (event, refusal) = match (fence, &live) {
            (Some(f), Some(l)) if l.fence == f => return Ok(None),
            (None, None) => return Ok(None),
            (Some(f), _) => {
                details.insert(key.into(), json!("lease_lost"));
                details.insert("fence".into(), json!(f));
                crate::telemetry::lease_event("lost");
                ("lease.lost", leases::lease_lost())
            }
            (None, Some(l)) => {
                details.insert(key.into(), json!("lease_held"));
                details.insert("held_by".into(), json!(l.holder));
                (event, leases::lease_held(l, now))
            }
        };
        audit::record(c, &self.keyring, ctx, event, Outcome::Failure, Some(user), Value::Object(details)).await?;
        Ok(Some(refusal))
    }

    /// A fenced act that succeeded ends the lease it held (audited `lease.released`, `by` the act).
    #[allow(clippy::too_many_arguments)]
    async fn consume_lease(
        &self,
        c: &mut Conn<'_>,
        ctx: &AuditContext,
        user: &str,
        fence: Option<i64>,
        version: i64,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<(), ServiceError> {
        let Some(f) = fence else { return Ok(()) };
        store::leases::release(c, user, f, now).await?;
        let details = json!({"fence": f, "version": version, "by": by});
        audit::record(c, &self.keyring, ctx, "lease.released", Outcome::Success, Some(user), details).await?;
        Ok(())
    }

    /// Destroys the ciphertext; the row remembers `reauth_required` and the reason. Honours
    /// `cond` (`If-Match`) and the user's refresh lease like a write, and ends the lease the
    /// request holds (there is no other live one, or it would have been refused).
    pub async fn invalidate(
        &self,
        ctx: &AuditContext,
        user: &UserId,
        reason: &str,
        cond: Precondition,
        fence: Option<i64>,
    ) -> Result<(), ServiceError> {
        let now = store::now();
        let u = user.as_str();
        let mut tx = self.db.begin_write_for(&[u]).await?;
        // No bundle: 404 whatever the preconditions (RFC 9110 13.1: they are evaluated only when
        // the request would otherwise succeed).
        let Some(current) = store::tokens::get(&mut tx.conn(), u).await? else {
            let details = json!({"reason": reason, "error": "not_found"});
            audit::record(&mut tx.conn(), &self.keyring, ctx, "token.invalidate", Outcome::Failure, Some(u), details)
                .await?;
            tx.commit().await?;
            return Err(ServiceError::NotFound(Missing::Tokens));
        };
        let mut refused = Map::new();
        refused.insert("reason".into(), json!(reason));
        if let Some(refusal) =
            self.lease_refusal(&mut tx.conn(), ctx, u, fence, "token.invalidate", refused, "error", now).await?
        {
            tx.commit().await?;
            return Err(refusal);
        }
        if let Err(conflict) = precondition(cond, Some(&current)) {
            let details = json!({"reason": reason, "error": "version_conflict", "current_version": current.version,
                                 "expected_version": expected_version(cond)});
            audit::record(&mut tx.conn(), &self.keyring, ctx, "token.invalidate", Outcome::Failure, Some(u), details)
                .await?;
            tx.commit().await?;
            return Err(conflict);
        }
        // Writers of the user are serialised, so the row is still the one checked; dropped, `tx` rolls back.
        let row = store::tokens::invalidate(&mut tx.conn(), u, current.version, reason, now)
            .await?
            .ok_or_else(|| ServiceError::Internal("the bundle changed while it was being invalidated".into()))?;
        self.consume_lease(&mut tx.conn(), ctx, u, fence, row.version, "invalidate", now).await?;
        let details = json!({"reason": reason, "version": row.version});
        audit::record(&mut tx.conn(), &self.keyring, ctx, "token.invalidate", Outcome::Success, Some(u), details)
            .await?;
        store::notify::announce(&mut tx.conn(), u, row.version).await?;
        tx.commit().await?;
        // Waiting readers wake up (and find the bundle gone: 410).
        self.notifier.publish(u, row.version);
        self.db.checkpoint_soon();
        Ok(())
    }

    /// Logout: removes the bundle and ends the user's login flows. 204 also when nothing was
    /// stored, unless `cond` (`If-Match`) asked for a bundle. Honours the user's refresh lease like
    /// a write, and ends the lease the request holds.
    pub async fn delete(
        &self,
        ctx: &AuditContext,
        user: &UserId,
        cond: Precondition,
        fence: Option<i64>,
    ) -> Result<(), ServiceError> {
        let now = store::now();
        let u = user.as_str();
        let mut tx = self.db.begin_write_for(&[u]).await?;
        if let Some(refusal) =
            self.lease_refusal(&mut tx.conn(), ctx, u, fence, "token.delete", Map::new(), "error", now).await?
        {
            tx.commit().await?;
            return Err(refusal);
        }
        let current = store::tokens::get(&mut tx.conn(), u).await?;
        if let Err(conflict) = precondition(cond, current.as_ref()) {
            let details = json!({"error": "version_conflict", "current_version": current.as_ref().map(|r| r.version),
                                 "expected_version": expected_version(cond)});
            audit::record(&mut tx.conn(), &self.keyring, ctx, "token.delete", Outcome::Failure, Some(u), details)
                .await?;
            tx.commit().await?;
            return Err(conflict);
        }
        let existed = store::tokens::delete(&mut tx.conn(), u).await?;
        let version = current.as_ref().map_or(0, |r| r.version);
        self.consume_lease(&mut tx.conn(), ctx, u, fence, version, "delete", now).await?;
        audit::record(
            &mut tx.conn(),
            &self.keyring,
            ctx,
            "token.delete",
            Outcome::Success,
            Some(u),
            json!({"existed": existed}),
        )
        .await?;
        // Logout also ends the user's login flows: sessions and live challenges are cancelled.
        crate::services::sessions::end_user_flows(
            &mut tx.conn(),
            &self.keyring,
            ctx,
            u,
            crate::domain::mfa::SessionState::Cancelled,
            "logout",
            now,
        )
        .await?;
        if existed {
            store::notify::announce(&mut tx.conn(), u, version).await?;
        }
        tx.commit().await?;
        if existed {
            // Waiting readers wake up (and find the bundle gone: 404).
            self.notifier.publish(u, version);
            self.db.checkpoint_soon();
        }
        Ok(())
    }
}

fn expected_version(cond: Precondition) -> Option<i64> {
    match cond {
        Precondition::VersionIs(v) => Some(v),
        _ => None,
    }
}

/// The refusal of a precondition that does not hold on `current`.
fn conflict(cond: Precondition, current: Option<&BundleRow>) -> ServiceError {
    ServiceError::VersionConflict {
        current_version: current.map(|r| r.version),
        expected_absent: matches!(cond, Precondition::Absent),
    }
}

/// Whether an `If-Match` precondition holds on the stored bundle (`current`).
fn precondition(cond: Precondition, current: Option<&BundleRow>) -> Result<(), ServiceError> {
    let holds = match (cond, current) {
        (Precondition::None, _) | (Precondition::Exists, Some(_)) => true,
        (Precondition::VersionIs(v), Some(r)) => r.version == v,
        (Precondition::Exists | Precondition::VersionIs(_), None) => false,
        // Only PUT takes `If-None-Match: *` (its SQL checks it, with the expiry).
        (Precondition::Absent, r) => r.is_none_or(|r| !r.has_secret),
    };
    if holds { Ok(()) } else { Err(conflict(cond, current)) }
}

impl Vault {
    /// Destroys the ciphertext of every bundle past its refresh expiry at `now` (`token.expired`,
    /// reason `refresh_expired`; the version moves on), then wakes the readers waiting for a newer
    /// version (they find the bundle gone: 410). Read in batches of `batch`; each user is its own
    /// transaction under that user's lock. Returns how many bundles expired.
    pub async fn expire_due(&self, ctx: &AuditContext, now: DateTime<Utc>, batch: i64) -> store::Result<u64> {
        let mut expired = 0;
        loop {
            let users = {
                let mut rc = self.db.read().await?;
                store::tokens::due_for_expiry(&mut rc.conn(), now, batch).await?
            };
            for u in &users {
                let mut tx = self.db.begin_write_for(&[u.as_str()]).await?;
                let mut c = tx.conn();
                let mut expired_version = None;
                if let Some(row) = store::tokens::expire(&mut c, u, now).await? {
                    expired_version = Some(row.version);
                    expired += 1;
                    audit::record(
                        &mut c,
                        &self.keyring,
                        ctx,
                        "token.expired",
                        Outcome::Success,
                        Some(u.as_str()),
                        json!({"reason": "refresh_expired", "version": row.version}),
                    )
                    .await?;
                    // Waiters in other instances hear it too (PostgreSQL NOTIFY, sent at commit).
                    store::notify::announce(&mut c, u, row.version).await?;
                }
                tx.commit().await?;
                if let Some(v) = expired_version {
                    self.notifier.publish(u, v);
                    self.db.checkpoint_soon();
                }
            }
            if (users.len() as i64) < batch {
                return Ok(expired);
            }
        }
    }
}
