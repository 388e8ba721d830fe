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

CREATE TABLE audit_events (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         UUID NOT NULL UNIQUE,
    at         TIMESTAMPTZ NOT NULL,
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
