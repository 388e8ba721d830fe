-- Login sessions (the state machine of one login flow) and MFA challenges.

CREATE TABLE sessions (
    id           BLOB PRIMARY KEY NOT NULL,
    user_id      TEXT NOT NULL,
    state        TEXT NOT NULL,
    challenge_id BLOB,
    client_ip    TEXT,
    user_agent   TEXT,
    reason       TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id, created_at);
CREATE INDEX sessions_active_expiry ON sessions (expires_at)
    WHERE state IN ('started', 'mfa_required', 'mfa_verified');

CREATE TABLE challenges (
    id            BLOB PRIMARY KEY NOT NULL,
    user_id       TEXT NOT NULL,
    session_id    BLOB,
    method        TEXT NOT NULL,
    verifier      TEXT NOT NULL,
    destination   TEXT,
    status        TEXT NOT NULL,
    attempts      INTEGER NOT NULL,
    max_attempts  INTEGER NOT NULL,
    code_hash     TEXT,
    resume_state  BLOB,
    resume_key_id TEXT,
    expires_at    TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    verified_at   TEXT,
    consumed_at   TEXT
);
CREATE INDEX challenges_user_status ON challenges (user_id, status);
CREATE INDEX challenges_session ON challenges (session_id) WHERE session_id IS NOT NULL;
CREATE INDEX challenges_live_expiry ON challenges (expires_at) WHERE status IN ('pending', 'verified');
CREATE INDEX challenges_resume_key ON challenges (resume_key_id) WHERE resume_key_id IS NOT NULL;

-- Codes tried against an externally verified challenge: a keyed hash (never the code), so a
-- replayed code is refused before it reaches Garmin.
CREATE TABLE challenge_attempts (
    challenge_id BLOB NOT NULL,
    n            INTEGER NOT NULL,
    code_mac     BLOB NOT NULL,
    result       TEXT,
    created_at   TEXT NOT NULL,
    resolved_at  TEXT,
    PRIMARY KEY (challenge_id, n),
    UNIQUE (challenge_id, code_mac)
);

-- Failed MFA attempts per user, for the rolling failure budget.
CREATE TABLE mfa_failures (
    user_id      TEXT NOT NULL,
    challenge_id BLOB NOT NULL,
    at           TEXT NOT NULL
);
CREATE INDEX mfa_failures_user_at ON mfa_failures (user_id, at);
CREATE INDEX mfa_failures_at ON mfa_failures (at);
