-- The audit chain head is authenticated (issue 15, finding 5) and can be anchored after a
-- retention purge (finding 4).
--
-- head_mac    = HMAC-SHA256(K_head, chain id || last_seq || last_hmac || anchor_seq || anchor_hmac
--               || head_key_id), K_head derived from the keyring key `head_key_id`
--               ("audit-head/v1"). Rewinding or wiping the log and rewriting the head without the
--               key no longer verifies. NULL until the service seals it (first start after this
--               migration, or `rewrap`).
-- anchor_seq  = the last event removed by the retention purge (0: nothing purged); the oldest
--               retained event is anchor_seq + 1 and chains from anchor_hmac.
ALTER TABLE audit_chain ADD COLUMN anchor_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE audit_chain ADD COLUMN anchor_hmac BLOB NOT NULL
    DEFAULT X'0000000000000000000000000000000000000000000000000000000000000000';
ALTER TABLE audit_chain ADD COLUMN head_key_id TEXT;
ALTER TABLE audit_chain ADD COLUMN head_mac BLOB;
