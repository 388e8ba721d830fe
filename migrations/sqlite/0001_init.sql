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

CREATE TABLE audit_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         BLOB NOT NULL UNIQUE,
    at         TEXT NOT NULL,
    type       TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    user_id    TEXT,
    actor      TEXT,
    request_id TEXT,
    source_ip  TEXT,
    details    TEXT NOT NULL
);
CREATE INDEX audit_events_user ON audit_events (user_id, seq);
CREATE INDEX audit_events_type ON audit_events (type, seq);
