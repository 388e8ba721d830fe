-- Idempotency-Key records, one per (API key, key). No secret here: the key and the request are
-- stored as hashes (the request's under a keyring-derived HMAC key, named by `hash_key_id`), the
-- answer only as a keyring envelope. `running` rows hold a lease (`locked_until`) so a crashed
-- instance cannot block a key for longer than that; `expires_at` is when the sweeper purges it.
CREATE TABLE idempotency_keys (
    api_key_id   BLOB NOT NULL,
    key_hash     BLOB NOT NULL,
    request_hash BLOB NOT NULL,
    hash_key_id  TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('running', 'done')),
    owner        BLOB,
    locked_until TEXT,
    response     BLOB,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    PRIMARY KEY (api_key_id, key_hash)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
