-- Login sessions (the state machine of one login flow) and MFA challenges.

CREATE TABLE sessions (
    id           UUID PRIMARY KEY,
    user_id      TEXT NOT NULL,
    state        TEXT NOT NULL,
    challenge_id UUID,
    client_ip    TEXT,
    user_agent   TEXT,
    reason       TEXT,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id, created_at);
CREATE INDEX sessions_active_expiry ON sessions (expires_at)
    WHERE state IN ('started', 'mfa_required', 'mfa_verified');

CREATE TABLE challenges (
    id            UUID PRIMARY KEY,
    user_id       TEXT NOT NULL,
    session_id    UUID,
    method        TEXT NOT NULL,
    verifier      TEXT NOT NULL,
    destination   TEXT,
    status        TEXT NOT NULL,
    attempts      BIGINT NOT NULL,
    max_attempts  BIGINT NOT NULL,
    code_hash     TEXT,
    resume_state  BYTEA,
    resume_key_id TEXT,
    expires_at    TIMESTAMPTZ NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL,
    verified_at   TIMESTAMPTZ,
    consumed_at   TIMESTAMPTZ
);
CREATE INDEX challenges_user_status ON challenges (user_id, status);
CREATE INDEX challenges_session ON challenges (session_id) WHERE session_id IS NOT NULL;
CREATE INDEX challenges_live_expiry ON challenges (expires_at) WHERE status IN ('pending', 'verified');
CREATE INDEX challenges_resume_key ON challenges (resume_key_id) WHERE resume_key_id IS NOT NULL;

-- Codes tried against an externally verified challenge: a keyed hash (never the code), so a
-- replayed code is refused before it reaches Garmin.
CREATE TABLE challenge_attempts (
    challenge_id UUID NOT NULL,
    n            BIGINT NOT NULL,
    code_mac     BYTEA NOT NULL,
    result       TEXT,
    created_at   TIMESTAMPTZ NOT NULL,
    resolved_at  TIMESTAMPTZ,
    PRIMARY KEY (challenge_id, n),
    UNIQUE (challenge_id, code_mac)
);

-- Failed MFA attempts per user, for the rolling failure budget.
CREATE TABLE mfa_failures (
    user_id      TEXT NOT NULL,
    challenge_id UUID NOT NULL,
    at           TIMESTAMPTZ NOT NULL
);
CREATE INDEX mfa_failures_user_at ON mfa_failures (user_id, at);
CREATE INDEX mfa_failures_at ON mfa_failures (at);
