-- The partitioned audit chain (issue 16): no row or lock that every write takes.
--
-- Events written from now on go into one of `audit_partitions.partitions` chains (fixed here;
-- the service refuses to start if its own count differs), the chain of their user (or source
-- address, or actor; see services/audit.rs). Each chain has its own head in `audit_heads`
-- (position, seq and HMAC of its last event, retention anchor, head MAC) and its own HMAC chain
-- over (chain_id, pos). `seq` stays the one global order of `GET /audit/events`, handed out by
-- the sequence `audit_seq` (no lock held to commit; a rolled-back write leaves a gap, which is
-- not tampering).
--
-- Events written before this migration keep chain_id/pos NULL: they form the closed *legacy*
-- chain, still verified with its own encoding against its head in `audit_chain` (row 1), which
-- no new event advances (nor locks any more).
ALTER TABLE audit_events ADD COLUMN chain_id BIGINT;
ALTER TABLE audit_events ADD COLUMN pos BIGINT;
CREATE UNIQUE INDEX audit_events_chain_pos ON audit_events (chain_id, pos);

CREATE TABLE audit_partitions (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    partitions BIGINT NOT NULL
);
INSERT INTO audit_partitions (id, partitions) VALUES (1, 256);

-- head_mac = HMAC-SHA256(K_head, tag || chain_id || last_pos || last_seq || last_hmac ||
-- anchor_pos || anchor_seq || anchor_hmac || head_key_id); NULL until the service seals it.
CREATE TABLE audit_heads (
    chain_id    BIGINT PRIMARY KEY,
    last_pos    BIGINT NOT NULL DEFAULT 0,
    last_seq    BIGINT NOT NULL DEFAULT 0,
    last_hmac   BYTEA NOT NULL DEFAULT decode(repeat('00', 32), 'hex'),
    anchor_pos  BIGINT NOT NULL DEFAULT 0,
    anchor_seq  BIGINT NOT NULL DEFAULT 0,
    anchor_hmac BYTEA NOT NULL DEFAULT decode(repeat('00', 32), 'hex'),
    head_key_id TEXT,
    head_mac    BYTEA
);
INSERT INTO audit_heads (chain_id) SELECT generate_series(0, 255);

CREATE SEQUENCE audit_seq AS BIGINT;
SELECT setval('audit_seq', GREATEST(m, 1), m > 0)
FROM (SELECT GREATEST(COALESCE((SELECT last_seq FROM audit_chain WHERE id = 1), 0),
                      COALESCE((SELECT MAX(seq) FROM audit_events), 0)) AS m) s;
