CREATE TABLE api_keys (
    id           UUID PRIMARY KEY,
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    key_hash     BYTEA NOT NULL UNIQUE,
    scopes       TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    last_used_at TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ
);

CREATE TABLE token_bundles (
    user_id            TEXT PRIMARY KEY,
    kind               TEXT NOT NULL,
    version            BIGINT NOT NULL,
    key_id             TEXT,
    ciphertext         BYTEA,
    access_expires_at  TIMESTAMPTZ,
    refresh_expires_at TIMESTAMPTZ,
    reauth_reason      TEXT,
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL,
    last_used_at       TIMESTAMPTZ
);
CREATE INDEX token_bundles_key_id ON token_bundles (key_id) WHERE key_id IS NOT NULL;
CREATE INDEX token_bundles_refresh_expiry ON token_bundles (refresh_expires_at) WHERE ciphertext IS NOT NULL;

-- One row per key that has ever encrypted here: a known plaintext under that key, so a wrong key
-- with a known id is caught at start-up before anything is written.
CREATE TABLE key_checks (
    key_id     TEXT PRIMARY KEY,
    envelope   BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);

-- The audit log. `seq` is assigned by the service from `audit_chain` (gap-free, never reused);
-- `hmac` = HMAC-SHA256(K, previous event's hmac || canonical encoding of this event), where K is
-- derived from the keyring key named by `chain_key_id`. Editing, deleting or reordering rows
-- breaks the chain (`centraldb-mfa audit verify`, `GET /api/v1/audit/verify`).
CREATE TABLE audit_events (
    seq          BIGINT PRIMARY KEY,
    id           UUID NOT NULL UNIQUE,
    at           TIMESTAMPTZ NOT NULL,
    type         TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    user_id      TEXT,
    actor        TEXT,
    request_id   TEXT,
    source_ip    TEXT,
    details      TEXT NOT NULL,
    chain_key_id TEXT NOT NULL,
    hmac         BYTEA NOT NULL
);
CREATE INDEX audit_events_user ON audit_events (user_id, seq);
CREATE INDEX audit_events_type ON audit_events (type, seq);
CREATE INDEX audit_events_chain_key ON audit_events (chain_key_id);

-- The head of the audit chain: the last seq handed out and the last event's hmac. Updating it
-- first in every audit write takes a row lock that serialises chain writers across instances
-- (and the head catches deleted tail events).
CREATE TABLE audit_chain (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq  BIGINT NOT NULL,
    last_hmac BYTEA NOT NULL
);
INSERT INTO audit_chain (id, last_seq, last_hmac) VALUES (1, 0, decode(repeat('00', 32), 'hex'));
