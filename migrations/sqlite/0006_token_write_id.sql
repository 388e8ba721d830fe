-- A random id per token write, bound (with the version) into the ciphertext's associated data, so
-- an older ciphertext put back into the row no longer decrypts. NULL on rows written before this
-- migration (legacy associated data: user id and kind only); start-up and `rewrap` upgrade them.
ALTER TABLE token_bundles ADD COLUMN write_id BLOB;
CREATE INDEX token_bundles_legacy_aad ON token_bundles (user_id) WHERE ciphertext IS NOT NULL AND write_id IS NULL;
