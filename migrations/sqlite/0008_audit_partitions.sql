-- The partitioned audit chain (issue 16): no row that every write takes.
--
-- Events written from now on go into one of `audit_partitions.partitions` chains (fixed here;
-- the service refuses to start if its own count differs), the chain of their user (or source
-- address, or actor; see services/audit.rs). Each chain has its own head in `audit_heads`
-- (position, seq and HMAC of its last event, retention anchor, head MAC) and its own HMAC chain
-- over (chain_id, pos). `seq` stays the one global order of `GET /audit/events`; on SQLite it is
-- handed out from `audit_seq` (SQLite has one writer anyway).
--
-- Events written before this migration keep chain_id/pos NULL: they form the closed *legacy*
-- chain, still verified with its own encoding against its head in `audit_chain` (row 1), which
-- no new event advances.
ALTER TABLE audit_events ADD COLUMN chain_id INTEGER;
ALTER TABLE audit_events ADD COLUMN pos INTEGER;
CREATE UNIQUE INDEX audit_events_chain_pos ON audit_events (chain_id, pos);

CREATE TABLE audit_partitions (
    id         INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    partitions INTEGER NOT NULL
);
INSERT INTO audit_partitions (id, partitions) VALUES (1, 256);

-- head_mac = HMAC-SHA256(K_head, tag || chain_id || last_pos || last_seq || last_hmac ||
-- anchor_pos || anchor_seq || anchor_hmac || head_key_id); NULL until the service seals it.
CREATE TABLE audit_heads (
    chain_id    INTEGER PRIMARY KEY NOT NULL,
    last_pos    INTEGER NOT NULL DEFAULT 0,
    last_seq    INTEGER NOT NULL DEFAULT 0,
    last_hmac   BLOB NOT NULL DEFAULT X'0000000000000000000000000000000000000000000000000000000000000000',
    anchor_pos  INTEGER NOT NULL DEFAULT 0,
    anchor_seq  INTEGER NOT NULL DEFAULT 0,
    anchor_hmac BLOB NOT NULL DEFAULT X'0000000000000000000000000000000000000000000000000000000000000000',
    head_key_id TEXT,
    head_mac    BLOB
);
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 255)
INSERT INTO audit_heads (chain_id) SELECT i FROM n;

CREATE TABLE audit_seq (
    id       INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    last_seq INTEGER NOT NULL
);
INSERT INTO audit_seq (id, last_seq) VALUES (1, MAX(
    COALESCE((SELECT last_seq FROM audit_chain WHERE id = 1), 0),
    COALESCE((SELECT MAX(seq) FROM audit_events), 0)));
