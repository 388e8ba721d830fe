//! Login sessions: the state machine of one login flow, kept across requests and restarts.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    crypto::Keyring,
    domain::{UserId, mfa::SessionState},
    services::{
        audit::{self, AuditContext, Outcome},
        error::{Missing, ServiceError},
    },
    store::{self, Conn, Db, challenges::ChallengeRow, sessions::SessionRow},
};

/// What the client told us about itself (stored as given, shown back).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct ClientInfo {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SessionView {
    pub id: Uuid,
    pub user_id: String,
    /// `started`, `mfa_required`, `mfa_verified`, `authenticated`, `failed`, `cancelled`,
    /// `expired`, `superseded`. Past `expires_at` an active session reads `expired`.
    pub state: SessionState,
    pub challenge_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Why it reached its state, when known (`superseded`, `logout`, a caller's reason, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientInfo>,
}

/// The state a session is in as of `now` (an active session past its expiry is expired).
pub fn effective_state(row: &SessionRow, now: DateTime<Utc>) -> SessionState {
    let state = SessionState::parse(&row.state).unwrap_or(SessionState::Failed);
    if !state.is_terminal() && row.expires_at <= now { SessionState::Expired } else { state }
}

impl SessionView {
    pub fn from_row(row: &SessionRow, now: DateTime<Utc>) -> Self {
        let client = (row.client_ip.is_some() || row.user_agent.is_some())
            .then(|| ClientInfo { ip: row.client_ip.clone(), user_agent: row.user_agent.clone() });
        Self {
            id: row.id,
            user_id: row.user_id.clone(),
            state: effective_state(row, now),
            challenge_id: row.challenge_id,
            created_at: row.created_at,
            updated_at: row.updated_at,
            expires_at: row.expires_at,
            reason: row.reason.clone(),
            client,
        }
    }
}

pub const DEFAULT_TTL_SECS: i64 = 900;
pub const MAX_TTL_SECS: i64 = 86_400;

/// Moves a session from exactly `from` to `to`, auditing the move.
async fn transition_audited(
    c: &mut Conn<'_>,
    keyring: &Keyring,
    ctx: &AuditContext,
    id: Uuid,
    (from, to): (SessionState, SessionState),
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> store::Result<Option<SessionRow>> {
    let moved = store::sessions::transition(c, id, from.as_str(), to.as_str(), reason, now).await?;
    if let Some(m) = &moved {
        audit::record(
            c,
            keyring,
            ctx,
            "session.transition",
            Outcome::Success,
            Some(m.user_id.as_str()),
            json!({"session_id": m.id, "from": from, "to": to, "reason": reason}),
        )
        .await?;
    }
    Ok(moved)
}

/// Moves a session to `to` if its current state allows it, auditing the move. `None` when it
/// did not move (terminal, not allowed, or changed concurrently).
pub(crate) async fn move_session(
    c: &mut Conn<'_>,
    keyring: &Keyring,
    ctx: &AuditContext,
    row: &SessionRow,
    to: SessionState,
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> store::Result<Option<SessionRow>> {
    let stored = SessionState::parse(&row.state).unwrap_or(SessionState::Failed);
    let from = effective_state(row, now);
    if from == SessionState::Expired && stored != SessionState::Expired {
        // Past its TTL but not yet swept: it already reads `expired`, so that is what it
        // becomes; it never moves on to anything else (no superseding or reviving a dead flow).
        let expired =
            transition_audited(c, keyring, ctx, row.id, (stored, SessionState::Expired), Some("ttl"), now).await?;
        return Ok(if to == SessionState::Expired { expired } else { None });
    }
    if !from.can_move_to(to) {
        return Ok(None);
    }
    transition_audited(c, keyring, ctx, row.id, (stored, to), reason, now).await
}

/// Moves the session a challenge belongs to (if any), as [`move_session`] does.
pub(crate) async fn move_linked_session(
    c: &mut Conn<'_>,
    keyring: &Keyring,
    ctx: &AuditContext,
    ch: &ChallengeRow,
    to: SessionState,
    reason: &str,
    now: DateTime<Utc>,
) -> store::Result<Option<SessionRow>> {
    let Some(sid) = ch.session_id else { return Ok(None) };
    let Some(s) = store::sessions::get(c, sid).await? else { return Ok(None) };
    move_session(c, keyring, ctx, &s, to, Some(reason), now).await
}

/// Cancels a challenge (destroying its resume state), auditing it.
pub(crate) async fn cancel_challenge(
    c: &mut Conn<'_>,
    keyring: &Keyring,
    ctx: &AuditContext,
    ch: &ChallengeRow,
    reason: &str,
    now: DateTime<Utc>,
) -> store::Result<bool> {
    let done = store::challenges::cancel(c, ch.id, now).await?.is_some();
    if done {
        audit::record(
            c,
            keyring,
            ctx,
            "challenge.cancelled",
            Outcome::Success,
            Some(ch.user_id.as_str()),
            json!({"challenge_id": ch.id, "session_id": ch.session_id, "reason": reason}),
        )
        .await?;
    }
    Ok(done)
}

/// Ends every active session of a user (moving it to `to`) and cancels the user's live
/// challenges. Used by supersession (a new session) and by logout.
pub(crate) async fn end_user_flows(
    c: &mut Conn<'_>,
    keyring: &Keyring,
    ctx: &AuditContext,
    user: &str,
    to: SessionState,
    reason: &str,
    now: DateTime<Utc>,
) -> store::Result<()> {
    for s in store::sessions::list_unended(c, user).await? {
        move_session(c, keyring, ctx, &s, to, Some(reason), now).await?;
    }
    for ch in store::challenges::live_for_user(c, user).await? {
        cancel_challenge(c, keyring, ctx, &ch, reason, now).await?;
    }
    Ok(())
}

#[derive(Clone)]
pub struct Sessions {
    db: Db,
    keyring: Arc<Keyring>,
}

impl Sessions {
    pub fn new(db: Db, keyring: Arc<Keyring>) -> Self {
        Self { db, keyring }
    }

    /// Starts a login flow; the user's other active flows end as `superseded`.
    pub async fn create(
        &self,
        ctx: &AuditContext,
        user: &UserId,
        ttl_secs: i64,
        client: Option<ClientInfo>,
    ) -> Result<SessionView, ServiceError> {
        let now = store::now();
        let client = client.unwrap_or_default();
        let row = SessionRow {
            id: Uuid::now_v7(),
            user_id: user.to_string(),
            state: SessionState::Started.as_str().into(),
            challenge_id: None,
            client_ip: client.ip,
            user_agent: client.user_agent,
            reason: None,
            created_at: now,
            updated_at: now,
            expires_at: now + Duration::seconds(ttl_secs),
        };
        // The user's lock only: supersession touches this user's sessions and challenges, which
        // every other writer (sweeper included) changes under the same lock.
        let mut tx = self.db.begin_write_for(&[user.as_str()]).await?;
        let mut c = tx.conn();
        end_user_flows(&mut c, &self.keyring, ctx, user.as_str(), SessionState::Superseded, "superseded", now).await?;
        store::sessions::insert(&mut c, &row).await?;
        audit::record(
            &mut c,
            &self.keyring,
            ctx,
            "session.created",
            Outcome::Success,
            Some(user.as_str()),
            json!({"session_id": row.id, "ttl_seconds": ttl_secs}),
        )
        .await?;
        tx.commit().await?;
        Ok(SessionView::from_row(&row, now))
    }

    pub async fn get(&self, id: Uuid) -> Result<SessionView, ServiceError> {
        let mut rc = self.db.read().await?;
        let row = store::sessions::get(&mut rc.conn(), id).await?.ok_or_else(session_not_found)?;
        Ok(SessionView::from_row(&row, store::now()))
    }

    pub async fn list_active(&self, user: &UserId) -> Result<Vec<SessionView>, ServiceError> {
        let now = store::now();
        let mut rc = self.db.read().await?;
        let rows = store::sessions::list_active(&mut rc.conn(), user.as_str(), now).await?;
        Ok(rows.iter().map(|r| SessionView::from_row(r, now)).collect())
    }

    /// A caller-requested move. Terminal moves also cancel the session's live challenges.
    pub async fn transition(
        &self,
        ctx: &AuditContext,
        id: Uuid,
        to: SessionState,
        reason: Option<&str>,
    ) -> Result<SessionView, ServiceError> {
        let now = store::now();
        let mut tx = self.db.begin_write_for(&[]).await?;
        let mut c = tx.conn();
        store::lock_owner(&mut c, store::Owned::Session, id).await?;
        // Read under the lock: the state may have moved while we waited.
        let row = store::sessions::get(&mut c, id).await?.ok_or_else(session_not_found)?;
        let from = effective_state(&row, now);
        if !from.can_move_to(to) {
            return Err(invalid_transition(from, to));
        }
        let moved = move_session(&mut c, &self.keyring, ctx, &row, to, reason, now)
            .await?
            .ok_or_else(|| invalid_transition(from, to))?;
        if to.is_terminal() {
            for ch in store::challenges::live_for_session(&mut c, id).await? {
                cancel_challenge(&mut c, &self.keyring, ctx, &ch, &format!("session_{}", to.as_str()), now).await?;
            }
        }
        tx.commit().await?;
        Ok(SessionView::from_row(&moved, now))
    }

    /// `DELETE /sessions/{id}`: cancel. A session already over (in any terminal state) has
    /// nothing left to cancel: 204 as well, and it keeps its state.
    pub async fn cancel(&self, ctx: &AuditContext, id: Uuid) -> Result<(), ServiceError> {
        match self.transition(ctx, id, SessionState::Cancelled, Some("cancelled")).await {
            Ok(_) => Ok(()),
            Err(e) => match self.get(id).await {
                Ok(s) if s.state.is_terminal() => Ok(()),
                _ => Err(e),
            },
        }
    }

    /// The newest active session of a user, for `/auth-status`.
    pub async fn current(&self, user: &UserId) -> Result<Option<SessionView>, ServiceError> {
        Ok(self.list_active(user).await?.into_iter().next())
    }
}

pub fn session_not_found() -> ServiceError {
    ServiceError::NotFound(Missing::Session)
}

pub fn invalid_transition(from: SessionState, to: SessionState) -> ServiceError {
    ServiceError::InvalidTransition { from, to }
}

impl Sessions {
    /// Moves every active session past its expiry at `now` to `expired` (reason `ttl`) and
    /// cancels its live challenges (reason `session_expired`). Read in batches of `batch`; each
    /// session is its own transaction under its user's lock, re-read under it (another instance
    /// may have moved it already). Returns how many sessions expired.
    pub async fn expire_due(&self, ctx: &AuditContext, now: DateTime<Utc>, batch: i64) -> store::Result<u64> {
        let mut expired = 0;
        loop {
            let due = {
                let mut rc = self.db.read().await?;
                store::sessions::due_for_expiry(&mut rc.conn(), now, batch).await?
            };
            for s in &due {
                let mut tx = self.db.begin_write_for(&[s.user_id.as_str()]).await?;
                let mut c = tx.conn();
                if let Some(current) = store::sessions::get(&mut c, s.id).await?
                    && move_session(&mut c, &self.keyring, ctx, &current, SessionState::Expired, Some("ttl"), now)
                        .await?
                        .is_some()
                {
                    expired += 1;
                    for ch in store::challenges::live_for_session(&mut c, s.id).await? {
                        cancel_challenge(&mut c, &self.keyring, ctx, &ch, "session_expired", now).await?;
                    }
                }
                tx.commit().await?;
            }
            if (due.len() as i64) < batch {
                return Ok(expired);
            }
        }
    }
}
