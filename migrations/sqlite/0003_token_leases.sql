-- Refresh leases: at most one live lease per user. The row outlives the lease (and the bundle),
-- so `fence` only ever grows and is never reused.
CREATE TABLE token_leases (
    user_id    TEXT PRIMARY KEY NOT NULL,
    fence      INTEGER NOT NULL,
    lease_id   BLOB,
    holder     TEXT,
    expires_at TEXT,
    granted_at TEXT
);
CREATE INDEX token_leases_live ON token_leases (expires_at) WHERE expires_at IS NOT NULL;
