-- Timestamps are RFC 3339 UTC text written by the service (microsecond precision), so they sort
-- and compare correctly as strings. Ids are 16-byte UUID blobs.

CREATE TABLE api_keys (
    id           BLOB PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    key_hash     BLOB NOT NULL UNIQUE,
    scopes       TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    last_used_at TEXT,
    revoked_at   TEXT
);

CREATE TABLE token_bundles (
    user_id            TEXT PRIMARY KEY NOT NULL,
    kind               TEXT NOT NULL,
    version            INTEGER NOT NULL,
    key_id             TEXT,
    ciphertext         BLOB,
    access_expires_at  TEXT,
    refresh_expires_at TEXT,
    reauth_reason      TEXT,
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL,
    last_used_at       TEXT
);
CREATE INDEX token_bundles_key_id ON token_bundles (key_id) WHERE key_id IS NOT NULL;
CREATE INDEX token_bundles_refresh_expiry ON token_bundles (refresh_expires_at) WHERE ciphertext IS NOT NULL;

-- One row per key that has ever encrypted here: a known plaintext under that key, so a wrong key
-- with a known id is caught at start-up before anything is written.
CREATE TABLE key_checks (
    key_id     TEXT PRIMARY KEY NOT NULL,
    envelope   BLOB NOT NULL,
    created_at TEXT NOT NULL
);

-- The audit log. `seq` is assigned by the service from `audit_chain` (gap-free, never reused);
-- `hmac` = HMAC-SHA256(K, previous event's hmac || canonical encoding of this event), where K is
-- derived from the keyring key named by `chain_key_id`. Editing, deleting or reordering rows
-- breaks the chain (`centraldb-mfa audit verify`, `GET /api/v1/audit/verify`).
CREATE TABLE audit_events (
    seq          INTEGER PRIMARY KEY NOT NULL,
    id           BLOB NOT NULL UNIQUE,
    at           TEXT NOT NULL,
    type         TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    user_id      TEXT,
    actor        TEXT,
    request_id   TEXT,
    source_ip    TEXT,
    details      TEXT NOT NULL,
    chain_key_id TEXT NOT NULL,
    hmac         BLOB NOT NULL
);
CREATE INDEX audit_events_user ON audit_events (user_id, seq);
CREATE INDEX audit_events_type ON audit_events (type, seq);
CREATE INDEX audit_events_chain_key ON audit_events (chain_key_id);

-- The head of the audit chain: the last seq handed out and the last event's hmac. Updating it
-- first in every audit write serialises chain writers (and catches deleted tail events).
CREATE TABLE audit_chain (
    id        INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    last_seq  INTEGER NOT NULL,
    last_hmac BLOB NOT NULL
);
INSERT INTO audit_chain (id, last_seq, last_hmac) VALUES (1, 0, zeroblob(32));
