//! `ServiceError`: why a rule of the service refused or failed, in the domain's words.
//!
//! The services return these and never choose how a refusal is shown to a client: `api::error`
//! holds the one table that turns each variant into a response. [`ServiceError::reason`] gives
//! the stable word for a refusal, the one audit details and metrics record.

use chrono::{DateTime, Utc};

use crate::{
    domain::mfa::{ChallengeStatus, SessionState},
    store::StoreError,
};

/// What a lookup did not find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// No token bundle is stored for the user.
    Tokens,
    Session,
    Challenge,
    /// No attempt with this number on the challenge.
    Attempt(i64),
}

/// Why a caller must wait: a bounded resource of the service is used up for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusyCause {
    /// The argon2 queue of code checks is full.
    CodeChecks,
    /// The service-wide cap of pending challenges is reached.
    PendingChallenges,
    /// Too many readers already long-poll for new versions.
    VersionWaiters,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("not found: {0:?}")]
    NotFound(Missing),
    /// A version precondition does not hold: `expected_absent` when the caller wanted no bundle
    /// stored (`Absent`), else it named a version or asked for an existing bundle.
    #[error("version conflict (stored: {current_version:?})")]
    VersionConflict { current_version: Option<i64>, expected_absent: bool },
    /// Another holder's refresh lease is live; `retry_after_secs` is the time left on it.
    #[error("the refresh lease is held by {holder}")]
    LeaseHeld { holder: String, expires_at: Option<DateTime<Utc>>, retry_after_secs: u64 },
    /// The fence presented is not the live lease any more.
    #[error("the lease was lost")]
    LeaseLost,
    /// The challenge is past its expiry, or (`session_state`) its login session has ended.
    #[error("the challenge has expired")]
    ChallengeExpired { session_state: Option<SessionState> },
    /// No attempts are left on the challenge (or it failed).
    #[error("the challenge is locked")]
    ChallengeLocked,
    #[error("the challenge is {}", .status.as_str())]
    ChallengeNotPending { status: ChallengeStatus },
    /// A wrong code; `attempts_remaining` when the check was ours to make.
    #[error("the code is not right")]
    InvalidCode { attempts_remaining: Option<i64> },
    /// The same code was already tried on this challenge (no attempt was used).
    #[error("this code was already tried on this challenge")]
    DuplicateCode,
    #[error("the result of attempt {attempt} was already recorded")]
    AttemptResolved { attempt: i64 },
    #[error("a session cannot move from {} to {}", .from.as_str(), .to.as_str())]
    InvalidTransition { from: SessionState, to: SessionState },
    /// Too many failed MFA attempts for the user within the failure window.
    #[error("too many failed MFA attempts")]
    TooManyFailures { retry_after_secs: u64 },
    /// The user already has `pending` challenges, the most allowed.
    #[error("too many pending challenges ({pending})")]
    TooManyChallenges { pending: usize, retry_after_secs: u64 },
    #[error("busy: {0:?}")]
    Busy(BusyCause),
    /// The stored login can no longer be used (invalidated, destroyed, refresh expired).
    #[error("a new login is required: {reason}")]
    ReauthRequired { reason: String },
    /// A stored ciphertext failed to decrypt (tampered, moved, or a wrong key).
    #[error("stored data could not be decrypted")]
    DecryptFailed,
    /// A request value the rules refuse, naming its field.
    #[error("invalid {field}: {detail}")]
    InvalidField { field: String, detail: String },
    /// A request the rules refuse as a whole.
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    pub fn field(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::InvalidField { field: field.into(), detail: detail.into() }
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::Invalid(detail.into())
    }

    /// The stable word for this refusal, as audit details and metrics record it (the API's
    /// problem codes use the same words).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound(Missing::Tokens) => "tokens_not_found",
            Self::NotFound(Missing::Session) => "session_not_found",
            Self::NotFound(Missing::Challenge) => "challenge_not_found",
            Self::NotFound(Missing::Attempt(_)) => "attempt_not_found",
            Self::VersionConflict { .. } => "version_conflict",
            Self::LeaseHeld { .. } => "lease_held",
            Self::LeaseLost => "lease_lost",
            Self::ChallengeExpired { .. } => "challenge_expired",
            Self::ChallengeLocked => "challenge_locked",
            Self::ChallengeNotPending { .. } => "challenge_not_pending",
            Self::InvalidCode { .. } => "invalid_code",
            Self::DuplicateCode => "duplicate_code",
            Self::AttemptResolved { .. } => "attempt_resolved",
            Self::InvalidTransition { .. } => "invalid_transition",
            Self::TooManyFailures { .. } => "too_many_failures",
            Self::TooManyChallenges { .. } => "too_many_challenges",
            Self::Busy(_) => "unavailable",
            Self::ReauthRequired { .. } => "reauth_required",
            Self::InvalidField { .. } | Self::Invalid(_) => "validation_failed",
            Self::Store(StoreError::Unavailable(_)) => "unavailable",
            Self::Store(StoreError::Full) => "insufficient_storage",
            Self::DecryptFailed | Self::Store(StoreError::Other(_)) | Self::Internal(_) => "internal_error",
        }
    }
}
