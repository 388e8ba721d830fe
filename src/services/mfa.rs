//! MFA challenges, checked by this service (argon2id hash of the code) or by Garmin (this
//! service keeps the opaque login state, encrypted, and enforces the limits).
//!
//! Every limit is enforced by a conditional statement in the database: an attempt is reserved
//! (`attempts < max_attempts`) before any code is checked, and `pending → verified`,
//! `verified → consumed` happen at most once, whatever the number of concurrent requests or
//! service instances.

use std::{sync::Arc, time::Duration as StdDuration};

use chrono::{DateTime, Duration, Utc};
use hmac::{KeyInit, Mac};
use serde::Serialize;
use serde_json::json;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::{
    crypto::{Aad, Keyring},
    domain::{
        UserId,
        mfa::{ChallengeStatus, Method, SessionState, Verifier},
    },
    services::{
        audit::{self, AuditContext, Outcome},
        code_hasher::{CodeHasher, HashError},
        error::{BusyCause, Missing, ServiceError},
        sessions::{self, cancel_challenge, effective_state, move_linked_session, move_session, session_not_found},
    },
    store::{self, Conn, Db, challenges::ChallengeRow},
};

use crate::config::MfaLimits;

pub const DEFAULT_TTL_SECS: i64 = 300;
pub const MAX_TTL_SECS: i64 = 600;
pub const DEFAULT_MAX_ATTEMPTS: i64 = 5;
pub const MAX_MAX_ATTEMPTS: i64 = 10;
pub const MAX_RESUME_STATE_BYTES: usize = 16 * 1024;
/// How far below the service-wide pending cap creations skip the cap lock and the exact count:
/// more than the transactions that can be open at once (PostgreSQL's `max_connections`, the
/// pools of every instance), so the creations the counter cannot see yet cannot pass the cap.
const CAP_SLACK: i64 = 1024;

/// A challenge as the API shows it: never the code, its hash or the resume state.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChallengeView {
    pub id: Uuid,
    pub user_id: String,
    pub session_id: Option<Uuid>,
    pub method: Method,
    pub verifier: Verifier,
    /// Masked (`j***@example.com`, `*******1234`).
    pub destination: Option<String>,
    /// Past `expires_at` a pending or verified challenge reads `expired`.
    pub status: ChallengeStatus,
    pub attempts: i64,
    pub max_attempts: i64,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumed_at: Option<DateTime<Utc>>,
    /// The generated code, in the creation response only (when this service made it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

pub fn effective_status(row: &ChallengeRow, now: DateTime<Utc>) -> ChallengeStatus {
    let s = ChallengeStatus::parse(&row.status).unwrap_or(ChallengeStatus::Failed);
    match s {
        ChallengeStatus::Pending | ChallengeStatus::Verified if row.expires_at <= now => ChallengeStatus::Expired,
        other => other,
    }
}

impl ChallengeView {
    pub fn from_row(row: &ChallengeRow, now: DateTime<Utc>) -> Self {
        Self {
            id: row.id,
            user_id: row.user_id.clone(),
            session_id: row.session_id,
            method: Method::parse(&row.method).unwrap_or(Method::Email),
            verifier: Verifier::parse(&row.verifier).unwrap_or(Verifier::Service),
            destination: row.destination.clone(),
            status: effective_status(row, now),
            attempts: row.attempts,
            max_attempts: row.max_attempts,
            expires_at: row.expires_at,
            created_at: row.created_at,
            verified_at: row.verified_at,
            consumed_at: row.consumed_at,
            code: None,
        }
    }
}

pub struct NewChallenge {
    pub user: UserId,
    pub session_id: Option<Uuid>,
    pub method: Method,
    pub verifier: Verifier,
    /// Already masked.
    pub destination: Option<String>,
    pub code: Option<Zeroizing<String>>,
    pub ttl_secs: i64,
    pub max_attempts: i64,
    pub resume_state: Option<Zeroizing<String>>,
}

/// The answer to a right code (service verifier).
#[derive(Debug, Serialize, ToSchema)]
pub struct Verified {
    /// Always `verified`.
    pub status: ChallengeStatus,
    pub verified_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_state: Option<String>,
}

/// A reserved attempt at an externally checked challenge.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptReserved {
    pub attempt: i64,
    pub attempts_remaining: i64,
    pub resume_state: Option<String>,
}

#[derive(Clone)]
pub struct Mfa {
    db: Db,
    keyring: Arc<Keyring>,
    hasher: CodeHasher,
    limits: Arc<MfaLimits>,
    /// The detached writes still running: graceful shutdown waits for them (see
    /// [`Mfa::tasks`]) before it closes the database pool.
    tasks: TaskTracker,
}

/// What a resume state is bound to (also used by `rewrap`).
pub fn resume_aad(id: Uuid) -> Aad {
    Aad::new(&["challenge_resume", &id.to_string()])
}

/// Counts one MFA code check: `verified`, or the reason it was refused with (a closed set:
/// [`ServiceError::reason`]).
fn mfa_outcome(verifier: Verifier, refusal: Option<&'static str>) {
    let outcome = refusal.unwrap_or("verified");
    metrics::counter!(crate::telemetry::MFA_OUTCOMES, "verifier" => verifier.as_str(), "outcome" => outcome)
        .increment(1);
}

fn secs_until(t: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    (t - now).num_seconds().max(1) as u64
}

fn busy(e: HashError) -> ServiceError {
    match e {
        HashError::Busy => ServiceError::Busy(BusyCause::CodeChecks),
        HashError::Internal(m) => ServiceError::Internal(m),
    }
}

pub fn challenge_not_found() -> ServiceError {
    ServiceError::NotFound(Missing::Challenge)
}

/// The error for a challenge that cannot take an attempt (or be consumed) in its state.
fn not_usable(row: &ChallengeRow, now: DateTime<Utc>) -> ServiceError {
    match effective_status(row, now) {
        ChallengeStatus::Expired => ServiceError::ChallengeExpired { session_state: None },
        ChallengeStatus::Failed => ServiceError::ChallengeLocked,
        ChallengeStatus::Pending if row.attempts >= row.max_attempts => ServiceError::ChallengeLocked,
        status => ServiceError::ChallengeNotPending { status },
    }
}

/// The answer for a challenge whose login session has ended (`state`).
fn session_ended(state: SessionState) -> ServiceError {
    ServiceError::ChallengeExpired { session_state: Some(state) }
}

/// How long after its last reserved attempt a service challenge with no attempt left may still
/// be waiting for the outcome of a check in progress (on any instance).
const SETTLE_WAIT: StdDuration = StdDuration::from_secs(5);

/// Runs an MFA operation to completion in a task of its own, whatever happens to the request
/// that asked for it: hyper drops a handler's future when the client goes away (and the request
/// timeout drops it too), which would leave a reserved attempt without its check, its outcome or
/// its audit event. The caller still gets the answer when it waits for it.
async fn detached<T: Send + 'static>(
    tasks: &TaskTracker,
    op: impl Future<Output = Result<T, ServiceError>> + Send + 'static,
) -> Result<T, ServiceError> {
    use tracing::Instrument;
    match tasks.spawn(op.in_current_span()).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(ServiceError::Internal("an MFA operation panicked".into())),
        Err(_) => Err(ServiceError::Internal("an MFA operation was cancelled".into())),
    }
}

impl Mfa {
    pub fn new(db: Db, keyring: Arc<Keyring>, hasher: CodeHasher, limits: MfaLimits) -> Self {
        Self { db, keyring, hasher, limits: Arc::new(limits), tasks: TaskTracker::new() }
    }

    /// The tracker of the detached writes: at shutdown, `close()` it and `wait()` for them,
    /// so a write whose client went away is still finished and recorded.
    pub fn tasks(&self) -> TaskTracker {
        self.tasks.clone()
    }

    // Every write runs detached (see [`detached`]): once begun, it finishes and is recorded.

    pub async fn create(&self, ctx: &AuditContext, new: NewChallenge) -> Result<ChallengeView, ServiceError> {
        let (this, ctx) = (self.clone(), ctx.clone());
        detached(&self.tasks, async move { this.create_now(&ctx, new).await }).await
    }

    /// Checks a code against a service-verified challenge: the attempt, the argon2 check and its
    /// outcome (failure counted, audit, session moved) complete even if the client goes away.
    pub async fn verify(
        &self,
        ctx: &AuditContext,
        id: Uuid,
        code: Zeroizing<String>,
    ) -> Result<Verified, ServiceError> {
        let (this, ctx) = (self.clone(), ctx.clone());
        let result = detached(&self.tasks, async move { this.verify_now(&ctx, id, code).await }).await;
        mfa_outcome(Verifier::Service, result.as_ref().err().map(ServiceError::reason));
        result
    }

    pub async fn attempt(
        &self,
        ctx: &AuditContext,
        id: Uuid,
        code: Zeroizing<String>,
    ) -> Result<AttemptReserved, ServiceError> {
        let (this, ctx) = (self.clone(), ctx.clone());
        detached(&self.tasks, async move { this.attempt_now(&ctx, id, code).await }).await
    }

    pub async fn attempt_result(
        &self,
        ctx: &AuditContext,
        id: Uuid,
        n: i64,
        success: bool,
    ) -> Result<ChallengeView, ServiceError> {
        let (this, ctx) = (self.clone(), ctx.clone());
        let result = detached(&self.tasks, async move { this.attempt_result_now(&ctx, id, n, success).await }).await;
        let refusal = match &result {
            Ok(_) if !success => Some(ServiceError::InvalidCode { attempts_remaining: None }.reason()),
            Ok(_) => None,
            Err(e) => Some(e.reason()),
        };
        mfa_outcome(Verifier::External, refusal);
        result
    }

    pub async fn consume(&self, ctx: &AuditContext, id: Uuid) -> Result<ChallengeView, ServiceError> {
        let (this, ctx) = (self.clone(), ctx.clone());
        detached(&self.tasks, async move { this.consume_now(&ctx, id).await }).await
    }

    pub async fn cancel(&self, ctx: &AuditContext, id: Uuid) -> Result<(), ServiceError> {
        let (this, ctx) = (self.clone(), ctx.clone());
        detached(&self.tasks, async move { this.cancel_now(&ctx, id).await }).await
    }

    /// A write transaction holding the lock of the user challenge `id` belongs to (see
    /// `store::lock_owner`): every write to a challenge, its attempts, its session and its user's
    /// failures runs under that user's lock, and no common one, so logins of different users
    /// never wait for each other. An unknown challenge takes no lock (the caller answers 404).
    async fn begin_for_challenge(&self, id: Uuid) -> Result<store::WriteTx, ServiceError> {
        let mut tx = self.db.begin_write_for(&[]).await?;
        store::lock_owner(&mut tx.conn(), store::Owned::Challenge, id).await?;
        Ok(tx)
    }

    /// Records an attempt just reserved (the row carries its number).
    /// Audits a refused creation (`challenge.refused`, with the limit that refused it) in the
    /// caller's transaction.
    async fn audit_refusal(
        &self,
        c: &mut Conn<'_>,
        ctx: &AuditContext,
        user: &str,
        reason: &str,
        session_id: Option<Uuid>,
    ) -> store::Result<()> {
        let details = json!({"reason": reason, "session_id": session_id});
        audit::record(c, &self.keyring, ctx, "challenge.refused", Outcome::Denied, Some(user), details).await?;
        Ok(())
    }

    async fn audit_attempt(&self, c: &mut Conn<'_>, ctx: &AuditContext, row: &ChallengeRow) -> store::Result<()> {
        audit::record(
            c,
            &self.keyring,
            ctx,
            "challenge.attempt",
            Outcome::Success,
            Some(row.user_id.as_str()),
            json!({"challenge_id": row.id, "attempt": row.attempts}),
        )
        .await
        .map(|_| ())
    }

    /// Keyed hashes of a tried code, bound to the challenge (never the code itself): the first
    /// under the active key (the one stored), then one under every other key of the keyring,
    /// so a code tried before a key rotation is still recognised while the old key is held.
    fn code_macs(&self, id: Uuid, code: &str) -> Result<Vec<Vec<u8>>, ServiceError> {
        let active = self.keyring.active_key_id();
        let others = self.keyring.key_ids().into_iter().filter(|k| *k != active);
        std::iter::once(active)
            .chain(others)
            .map(|key_id| {
                let key = self
                    .keyring
                    .derive(key_id, "attempt-code/v1")
                    .ok_or_else(|| ServiceError::Internal("keyring key missing".into()))?;
                let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(key.as_slice())
                    .map_err(|_| ServiceError::Internal("hmac key".into()))?;
                mac.update(id.as_bytes());
                mac.update(code.as_bytes());
                Ok(mac.finalize().into_bytes().to_vec())
            })
            .collect()
    }

    fn open_resume(&self, row: &ChallengeRow) -> Result<Option<String>, ServiceError> {
        let Some(ct) = &row.resume_state else { return Ok(None) };
        let plain = self.keyring.decrypt(ct, &resume_aad(row.id)).map_err(|_| ServiceError::DecryptFailed)?;
        String::from_utf8(plain.to_vec()).map(Some).map_err(|_| ServiceError::DecryptFailed)
    }

    async fn create_now(&self, ctx: &AuditContext, new: NewChallenge) -> Result<ChallengeView, ServiceError> {
        let id = Uuid::now_v7();
        let user = new.user.as_str().to_string();
        // CPU and crypto work before the transaction, to keep it short.
        let (code_hash, shown_code) = match new.verifier {
            Verifier::Service => {
                let (code, shown) = match new.code {
                    Some(c) => (c, None),
                    None => {
                        let c = crate::domain::mfa::generate_code();
                        let shown = c.to_string();
                        (c, Some(shown))
                    }
                };
                (Some(self.hasher.hash(code).await.map_err(busy)?), shown)
            }
            Verifier::External => (None, None),
        };
        let resume = new.resume_state.as_ref().map(|r| self.keyring.encrypt(r.as_bytes(), &resume_aad(id)));
        let now = store::now();
        let row = ChallengeRow {
            id,
            user_id: user.clone(),
            session_id: new.session_id,
            method: new.method.as_str().into(),
            verifier: new.verifier.as_str().into(),
            destination: new.destination,
            status: ChallengeStatus::Pending.as_str().into(),
            attempts: 0,
            max_attempts: new.max_attempts,
            code_hash,
            resume_key_id: resume.as_ref().map(|_| self.keyring.active_key_id().to_string()),
            resume_state: resume,
            expires_at: now + Duration::seconds(new.ttl_secs),
            created_at: now,
            updated_at: now,
            verified_at: None,
            consumed_at: None,
        };

        let mut tx = self.db.begin_write_for(&[user.as_str()]).await?;
        let mut c = tx.conn();
        let session = match new.session_id {
            None => None,
            Some(sid) => {
                let s = store::sessions::get(&mut c, sid).await?.ok_or_else(session_not_found)?;
                if s.user_id != user {
                    return Err(ServiceError::field("session_id", "the session belongs to another user"));
                }
                let state = effective_state(&s, now);
                if !matches!(state, SessionState::Started | SessionState::MfaRequired) {
                    return Err(sessions::invalid_transition(state, SessionState::MfaRequired));
                }
                Some(s)
            }
        };
        // Limits. The session's own pending challenge is about to be replaced, so it does not count.
        let window_start = now - Duration::from_std(self.limits.failure_window).unwrap_or(Duration::days(1));
        let (failures, oldest) = store::challenges::failures_since(&mut c, &user, window_start).await?;
        if failures >= self.limits.failure_budget {
            self.audit_refusal(&mut c, ctx, &user, "too_many_failures", new.session_id).await?;
            tx.commit().await?;
            let retry = oldest.map(|o| secs_until(o + (now - window_start), now)).unwrap_or(60);
            return Err(ServiceError::TooManyFailures { retry_after_secs: retry });
        }
        let pending = store::challenges::pending_for_user(&mut c, &user, now).await?;
        let (own, others): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|p| new.session_id.is_some() && p.session_id == new.session_id);
        if others.len() as i64 >= self.limits.max_pending_per_user {
            self.audit_refusal(&mut c, ctx, &user, "too_many_challenges", new.session_id).await?;
            tx.commit().await?;
            let retry = others.first().map(|p| secs_until(p.expires_at, now)).unwrap_or(1);
            return Err(ServiceError::TooManyChallenges { pending: others.len(), retry_after_secs: retry });
        }
        // The service-wide cap is the one invariant across users here. The counter rows
        // (migration 0009) give an upper bound (expired rows count until swept) in constant time.
        // Far below the cap nothing more is needed: uncommitted creations, invisible to the sum,
        // number at most the open transactions, far fewer than CAP_SLACK. Near the cap, creations
        // take a lock of their own (after the user lock, before any row or audit head lock) and
        // count the live ones exactly (at most cap rows), so concurrent creations of different
        // users, on any number of instances, can't both take the last place. Nothing else
        // (sessions, attempts, results, consumes, tokens) waits for that lock.
        let cap = self.limits.max_pending_global;
        let mut full = false;
        if store::challenges::pending_upper_bound(&mut c).await? >= cap.saturating_sub(CAP_SLACK) {
            store::lock(&mut c, store::PENDING_CAP_LOCK).await?;
            full = store::challenges::count_pending_global_upto(&mut c, now, cap).await? >= cap;
        }
        if full {
            self.audit_refusal(&mut c, ctx, &user, "global_cap", new.session_id).await?;
            tx.commit().await?;
            return Err(ServiceError::Busy(BusyCause::PendingChallenges));
        }
        for old in &own {
            cancel_challenge(&mut c, &self.keyring, ctx, old, "replaced_by_new_challenge", now).await?;
        }
        store::challenges::insert(&mut c, &row).await?;
        audit::record(
            &mut c,
            &self.keyring,
            ctx,
            "challenge.created",
            Outcome::Success,
            Some(user.as_str()),
            json!({"challenge_id": id, "session_id": row.session_id, "method": row.method, "verifier": row.verifier,
                   "ttl_seconds": new.ttl_secs, "max_attempts": row.max_attempts,
                   "code_generated": shown_code.is_some(), "resume_state": row.resume_state.is_some()}),
        )
        .await?;
        if let Some(s) = session {
            store::sessions::set_challenge(&mut c, s.id, id, now).await?;
            move_session(&mut c, &self.keyring, ctx, &s, SessionState::MfaRequired, Some("challenge_created"), now)
                .await?;
        }
        tx.commit().await?;
        let mut view = ChallengeView::from_row(&row, now);
        view.code = shown_code;
        Ok(view)
    }

    pub async fn get(&self, id: Uuid) -> Result<ChallengeView, ServiceError> {
        let mut rc = self.db.read().await?;
        let row = store::challenges::get(&mut rc.conn(), id).await?.ok_or_else(challenge_not_found)?;
        Ok(ChallengeView::from_row(&row, store::now()))
    }

    /// Records a refused use of a challenge (locked, expired, not pending) and returns the error.
    async fn refuse(&self, ctx: &AuditContext, type_: &str, row: &ChallengeRow, now: DateTime<Utc>) -> ServiceError {
        self.refuse_with(ctx, type_, row, not_usable(row, now)).await
    }

    async fn refuse_with(
        &self,
        ctx: &AuditContext,
        type_: &str,
        row: &ChallengeRow,
        err: ServiceError,
    ) -> ServiceError {
        let result = async {
            let mut tx = self.db.begin_write_for(&[row.user_id.as_str()]).await?;
            audit::record(
                &mut tx.conn(),
                &self.keyring,
                ctx,
                type_,
                Outcome::Denied,
                Some(row.user_id.as_str()),
                json!({"challenge_id": row.id, "reason": err.reason()}),
            )
            .await?;
            tx.commit().await
        }
        .await;
        match result {
            Ok(()) => err,
            Err(e) => e.into(),
        }
    }

    /// The state of the challenge's login session if that session has ended (past its TTL, or
    /// terminal): such a challenge takes no code, no result and is not consumed, so a late code
    /// or a late Garmin answer never revives a dead login.
    async fn ended_session(
        &self,
        c: &mut Conn<'_>,
        row: &ChallengeRow,
        now: DateTime<Utc>,
    ) -> Result<Option<SessionState>, ServiceError> {
        if let Some(sid) = row.session_id
            && let Some(s) = store::sessions::get(c, sid).await?
        {
            let state = effective_state(&s, now);
            if state.is_terminal() {
                return Ok(Some(state));
            }
        }
        Ok(None)
    }

    /// Ends a live challenge whose session has ended (`cancelled`, reason `session_<state>`, its
    /// resume state destroyed, as the sweeper would), records the refused use (`type_`,
    /// `denied`) and returns the answer, 410 `challenge_expired` with `session_state`. The caller
    /// commits.
    async fn end_with_session(
        &self,
        c: &mut Conn<'_>,
        ctx: &AuditContext,
        type_: &str,
        row: &ChallengeRow,
        state: SessionState,
        now: DateTime<Utc>,
    ) -> Result<ServiceError, ServiceError> {
        let err = session_ended(state);
        cancel_challenge(c, &self.keyring, ctx, row, &format!("session_{}", state.as_str()), now).await?;
        audit::record(
            c,
            &self.keyring,
            ctx,
            type_,
            Outcome::Denied,
            Some(row.user_id.as_str()),
            json!({"challenge_id": row.id, "reason": err.reason(), "session_state": state.as_str()}),
        )
        .await?;
        Ok(err)
    }

    /// A service challenge refused an attempt because none is left while still `pending`: the
    /// checks that used them are still running (here or on another instance). Waits (a bounded
    /// time) for their outcome, so a challenge one of them verifies is answered as verified
    /// (409), not as locked (423).
    async fn settled(&self, row: ChallengeRow) -> Result<ChallengeRow, ServiceError> {
        let pending = |r: &ChallengeRow| effective_status(r, store::now()) == ChallengeStatus::Pending;
        if !(row.verifier == Verifier::Service.as_str() && pending(&row) && row.attempts >= row.max_attempts) {
            return Ok(row);
        }
        let give_up = row.updated_at + Duration::from_std(SETTLE_WAIT).unwrap_or(Duration::seconds(5));
        let mut pause = StdDuration::from_millis(5);
        while store::now() < give_up {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(StdDuration::from_millis(50));
            let mut rc = self.db.read().await?;
            let fresh = store::challenges::get(&mut rc.conn(), row.id).await?.ok_or_else(challenge_not_found)?;
            // Only an end counts: a read may not see yet the reservations the write transaction
            // saw (SQLite's group commit makes them visible to readers a little later).
            if !pending(&fresh) {
                return Ok(fresh);
            }
        }
        Ok(row)
    }

    /// Checks a code against a service-verified challenge.
    async fn verify_now(
        &self,
        ctx: &AuditContext,
        id: Uuid,
        code: Zeroizing<String>,
    ) -> Result<Verified, ServiceError> {
        let now = store::now();
        let mut tx = self.begin_for_challenge(id).await?;
        let mut c = tx.conn();
        let current = store::challenges::get(&mut c, id).await?.ok_or_else(challenge_not_found)?;
        if current.verifier != Verifier::Service.as_str() {
            return Err(ServiceError::invalid("this challenge is checked by Garmin: use /attempts"));
        }
        // 0. A challenge that is locked, expired or done answers for that (once the checks in
        //    progress have settled); a challenge of an ended login session takes no code.
        let usable =
            effective_status(&current, now) == ChallengeStatus::Pending && current.attempts < current.max_attempts;
        if !usable {
            drop(tx);
            return Err(self.refuse_settled(ctx, current).await);
        }
        if let Some(state) = self.ended_session(&mut c, &current, now).await? {
            let err = self.end_with_session(&mut c, ctx, "challenge.verify", &current, state, now).await?;
            tx.commit().await?;
            return Err(err);
        }
        // 1. Reserve an attempt (atomically) before looking at the code, once a place in the
        //    argon2 queue is ours: a busy service answers 503 without using up an attempt.
        let admitted = match self.hasher.admit() {
            Ok(a) => a,
            Err(e) => {
                drop(tx);
                return Err(busy(e));
            }
        };
        let Some(row) = store::challenges::reserve_attempt(&mut c, id, Verifier::Service.as_str(), now).await? else {
            let row = store::challenges::get(&mut c, id).await?.ok_or_else(challenge_not_found)?;
            drop(tx);
            drop(admitted);
            return Err(self.refuse_settled(ctx, row).await);
        };
        self.audit_attempt(&mut c, ctx, &row).await?;
        tx.commit().await?;

        // 2. The expensive check, outside any transaction.
        let phc = row.code_hash.clone().unwrap_or_default();
        let right = self.hasher.verify_admitted(admitted, code, phc).await.map_err(busy)?;

        // 3. Record the outcome.
        let now = store::now();
        let mut tx = self.db.begin_write_for(&[row.user_id.as_str()]).await?;
        let mut c = tx.conn();
        if right {
            // The session may have ended while the code was checked.
            if let Some(state) = self.ended_session(&mut c, &row, now).await? {
                let err = self.end_with_session(&mut c, ctx, "challenge.verify", &row, state, now).await?;
                tx.commit().await?;
                return Err(err);
            }
            let consume_by = now + Duration::from_std(self.limits.consume_window).unwrap_or(Duration::minutes(5));
            let Some(done) = store::challenges::mark_verified(&mut c, id, now, consume_by).await? else {
                let current = store::challenges::get(&mut c, id).await?.ok_or_else(challenge_not_found)?;
                drop(tx);
                return Err(self.refuse(ctx, "challenge.verify", &current, now).await);
            };
            self.after_verified(&mut c, ctx, &done, now).await?;
            let resume_state = self.open_resume(&done)?;
            tx.commit().await?;
            return Ok(Verified { status: ChallengeStatus::Verified, verified_at: now, resume_state });
        }
        store::challenges::record_failure(&mut c, &row.user_id, id, now).await?;
        let remaining = (row.max_attempts - row.attempts).max(0);
        if remaining == 0 {
            self.lock_challenge(&mut c, ctx, &row, now).await?;
        } else {
            audit::record(
                &mut c,
                &self.keyring,
                ctx,
                "challenge.verify_failed",
                Outcome::Failure,
                Some(row.user_id.as_str()),
                json!({"challenge_id": id, "attempt": row.attempts, "attempts_remaining": remaining}),
            )
            .await?;
        }
        tx.commit().await?;
        Err(ServiceError::InvalidCode { attempts_remaining: Some(remaining) })
    }

    /// A refused `/verify` (no attempt could be taken), answered for the challenge's state once
    /// the checks in progress have settled.
    async fn refuse_settled(&self, ctx: &AuditContext, row: ChallengeRow) -> ServiceError {
        match self.settled(row).await {
            Ok(row) => self.refuse(ctx, "challenge.verify", &row, store::now()).await,
            Err(e) => e,
        }
    }

    async fn after_verified(
        &self,
        c: &mut Conn<'_>,
        ctx: &AuditContext,
        done: &ChallengeRow,
        now: DateTime<Utc>,
    ) -> Result<(), ServiceError> {
        audit::record(
            c,
            &self.keyring,
            ctx,
            "challenge.verified",
            Outcome::Success,
            Some(done.user_id.as_str()),
            json!({"challenge_id": done.id, "attempt": done.attempts, "session_id": done.session_id}),
        )
        .await?;
        move_linked_session(c, &self.keyring, ctx, done, SessionState::MfaVerified, "challenge_verified", now).await?;
        Ok(())
    }

    /// The last attempt failed: the challenge and its session fail.
    async fn lock_challenge(
        &self,
        c: &mut Conn<'_>,
        ctx: &AuditContext,
        row: &ChallengeRow,
        now: DateTime<Utc>,
    ) -> Result<(), ServiceError> {
        if store::challenges::mark_failed(c, row.id, now).await?.is_some() {
            audit::record(
                c,
                &self.keyring,
                ctx,
                "challenge.locked",
                Outcome::Failure,
                Some(row.user_id.as_str()),
                json!({"challenge_id": row.id, "attempts": row.attempts, "session_id": row.session_id}),
            )
            .await?;
            move_linked_session(c, &self.keyring, ctx, row, SessionState::Failed, "challenge_locked", now).await?;
        }
        Ok(())
    }

    /// Reserves an attempt at a Garmin-checked challenge; a code already tried is refused
    /// without using an attempt.
    async fn attempt_now(
        &self,
        ctx: &AuditContext,
        id: Uuid,
        code: Zeroizing<String>,
    ) -> Result<AttemptReserved, ServiceError> {
        let now = store::now();
        let macs = self.code_macs(id, &code)?;
        let mut tx = self.begin_for_challenge(id).await?;
        let mut c = tx.conn();
        let row = store::challenges::get(&mut c, id).await?.ok_or_else(challenge_not_found)?;
        if row.verifier != Verifier::External.as_str() {
            return Err(ServiceError::invalid("this challenge is checked by this service: use /verify"));
        }
        let usable = effective_status(&row, now) == ChallengeStatus::Pending && row.attempts < row.max_attempts;
        if !usable {
            drop(tx);
            return Err(self.refuse(ctx, "challenge.attempt", &row, now).await);
        }
        if let Some(state) = self.ended_session(&mut c, &row, now).await? {
            let err = self.end_with_session(&mut c, ctx, "challenge.attempt", &row, state, now).await?;
            tx.commit().await?;
            return Err(err);
        }
        let mut tried = false;
        for mac in &macs {
            tried = tried || store::challenges::code_tried(&mut c, id, mac).await?;
        }
        if tried {
            audit::record(
                &mut c,
                &self.keyring,
                ctx,
                "challenge.attempt",
                Outcome::Denied,
                Some(row.user_id.as_str()),
                json!({"challenge_id": id, "reason": "duplicate_code"}),
            )
            .await?;
            tx.commit().await?;
            return Err(ServiceError::DuplicateCode);
        }
        let Some(row) = store::challenges::reserve_attempt(&mut c, id, Verifier::External.as_str(), now).await? else {
            drop(tx);
            return Err(self.refuse(ctx, "challenge.attempt", &row, now).await);
        };
        let mac = macs.first().ok_or_else(|| ServiceError::Internal("no code MAC".into()))?;
        store::challenges::insert_attempt(&mut c, id, row.attempts, mac, now).await?;
        self.audit_attempt(&mut c, ctx, &row).await?;
        let resume_state = self.open_resume(&row)?;
        tx.commit().await?;
        Ok(AttemptReserved { attempt: row.attempts, attempts_remaining: row.max_attempts - row.attempts, resume_state })
    }

    /// Records Garmin's answer to attempt `n`.
    async fn attempt_result_now(
        &self,
        ctx: &AuditContext,
        id: Uuid,
        n: i64,
        success: bool,
    ) -> Result<ChallengeView, ServiceError> {
        let now = store::now();
        let mut tx = self.begin_for_challenge(id).await?;
        let mut c = tx.conn();
        let row = store::challenges::get(&mut c, id).await?.ok_or_else(challenge_not_found)?;
        match store::challenges::attempt_result(&mut c, id, n).await? {
            None => return Err(ServiceError::NotFound(Missing::Attempt(n))),
            Some(Some(_)) => return Err(ServiceError::AttemptResolved { attempt: n }),
            Some(None) => {}
        }
        store::challenges::resolve_attempt(&mut c, id, n, if success { "success" } else { "failure" }, now).await?;
        let final_row = if success {
            // Garmin accepted the code: the attempt was reserved before expiry, so the answer
            // counts even if it arrives after it. But not once the login it belongs to has ended
            // (past its TTL, failed, cancelled, superseded): the challenge ends with it, and the
            // answer is the one `/attempts` gives then (410). The result itself stays recorded.
            if row.status == ChallengeStatus::Pending.as_str()
                && let Some(state) = self.ended_session(&mut c, &row, now).await?
            {
                let err = self.end_with_session(&mut c, ctx, "challenge.verify", &row, state, now).await?;
                tx.commit().await?;
                return Err(err);
            }
            let consume_by = now + Duration::from_std(self.limits.consume_window).unwrap_or(Duration::minutes(5));
            let Some(done) = store::challenges::mark_verified(&mut c, id, now, consume_by).await? else {
                drop(tx);
                return Err(self.refuse(ctx, "challenge.verify", &row, now).await);
            };
            self.after_verified(&mut c, ctx, &done, now).await?;
            done
        } else {
            store::challenges::record_failure(&mut c, &row.user_id, id, now).await?;
            let open = store::challenges::open_attempts(&mut c, id).await?;
            if row.attempts >= row.max_attempts && open == 0 {
                self.lock_challenge(&mut c, ctx, &row, now).await?;
            } else {
                audit::record(
                    &mut c,
                    &self.keyring,
                    ctx,
                    "challenge.verify_failed",
                    Outcome::Failure,
                    Some(row.user_id.as_str()),
                    json!({"challenge_id": id, "attempt": n, "attempts_remaining": row.max_attempts - row.attempts}),
                )
                .await?;
            }
            store::challenges::get(&mut c, id).await?.ok_or_else(challenge_not_found)?
        };
        tx.commit().await?;
        Ok(ChallengeView::from_row(&final_row, now))
    }

    /// `verified` → `consumed`, exactly once.
    async fn consume_now(&self, ctx: &AuditContext, id: Uuid) -> Result<ChallengeView, ServiceError> {
        let now = store::now();
        let mut tx = self.begin_for_challenge(id).await?;
        let mut c = tx.conn();
        // A live challenge whose login session has ended is not handed over (and ends).
        if let Some(row) = store::challenges::get(&mut c, id).await?
            && matches!(effective_status(&row, now), ChallengeStatus::Pending | ChallengeStatus::Verified)
            && let Some(state) = self.ended_session(&mut c, &row, now).await?
        {
            let err = self.end_with_session(&mut c, ctx, "challenge.consume", &row, state, now).await?;
            tx.commit().await?;
            return Err(err);
        }
        let Some(done) = store::challenges::consume(&mut c, id, now).await? else {
            let row = store::challenges::get(&mut c, id).await?.ok_or_else(challenge_not_found)?;
            drop(tx);
            return Err(self.refuse(ctx, "challenge.consume", &row, now).await);
        };
        audit::record(
            &mut c,
            &self.keyring,
            ctx,
            "challenge.consumed",
            Outcome::Success,
            Some(done.user_id.as_str()),
            json!({"challenge_id": id, "session_id": done.session_id}),
        )
        .await?;
        tx.commit().await?;
        Ok(ChallengeView::from_row(&done, now))
    }

    /// `DELETE`: cancel a pending or verified challenge (idempotent once cancelled).
    async fn cancel_now(&self, ctx: &AuditContext, id: Uuid) -> Result<(), ServiceError> {
        let now = store::now();
        let mut tx = self.begin_for_challenge(id).await?;
        let mut c = tx.conn();
        let row = store::challenges::get(&mut c, id).await?.ok_or_else(challenge_not_found)?;
        // Already over (cancelled, consumed, failed, expired): nothing left to cancel.
        if !matches!(effective_status(&row, now), ChallengeStatus::Pending | ChallengeStatus::Verified) {
            return Ok(());
        }
        if !cancel_challenge(&mut c, &self.keyring, ctx, &row, "cancelled", now).await? {
            drop(tx);
            return Err(self.refuse(ctx, "challenge.cancel", &row, now).await);
        }
        tx.commit().await?;
        Ok(())
    }
}

/// What [`Mfa::expire_due`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChallengesExpired {
    pub challenges: u64,
    /// Sessions moved to `expired` because their challenge expired.
    pub sessions: u64,
}

impl Mfa {
    /// Expires every pending or verified challenge past its expiry at `now` (destroying its
    /// resume state, `challenge.expired`) and moves the session it belongs to, if that session
    /// still waits on it, to `expired` (reason `challenge_expired`). Read in batches of `batch`;
    /// each expiry is its own transaction under the lock of the user it is about, as every other
    /// writer of that user's challenges and sessions: a user's attempt or result and the sweeper
    /// take turns (the expiry is a conditional UPDATE either way), other users don't wait.
    pub async fn expire_due(
        &self,
        ctx: &AuditContext,
        now: DateTime<Utc>,
        batch: i64,
    ) -> store::Result<ChallengesExpired> {
        let mut done = ChallengesExpired::default();
        loop {
            let ids = {
                let mut rc = self.db.read().await?;
                store::challenges::due_for_expiry(&mut rc.conn(), now, batch).await?
            };
            for id in &ids {
                let mut tx = self.db.begin_write_for(&[]).await?;
                let mut c = tx.conn();
                store::lock_owner(&mut c, store::Owned::Challenge, *id).await?;
                if let Some(ch) = store::challenges::expire(&mut c, *id, now).await? {
                    done.challenges += 1;
                    audit::record(
                        &mut c,
                        &self.keyring,
                        ctx,
                        "challenge.expired",
                        Outcome::Success,
                        Some(ch.user_id.as_str()),
                        json!({"challenge_id": ch.id, "session_id": ch.session_id}),
                    )
                    .await?;
                    if let Some(sid) = ch.session_id
                        && let Some(s) = store::sessions::get(&mut c, sid).await?
                        && s.challenge_id == Some(ch.id)
                        && move_session(
                            &mut c,
                            &self.keyring,
                            ctx,
                            &s,
                            SessionState::Expired,
                            Some("challenge_expired"),
                            now,
                        )
                        .await?
                        .is_some()
                    {
                        done.sessions += 1;
                    }
                }
                tx.commit().await?;
            }
            if (ids.len() as i64) < batch {
                return Ok(done);
            }
        }
    }
}
