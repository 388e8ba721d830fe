-- Refresh leases: at most one live lease per user. The row outlives the lease (and the bundle),
-- so `fence` only ever grows and is never reused.
CREATE TABLE token_leases (
    user_id    TEXT PRIMARY KEY,
    fence      BIGINT NOT NULL,
    lease_id   UUID,
    holder     TEXT,
    expires_at TIMESTAMPTZ,
    granted_at TIMESTAMPTZ
);
CREATE INDEX token_leases_live ON token_leases (expires_at) WHERE expires_at IS NOT NULL;
