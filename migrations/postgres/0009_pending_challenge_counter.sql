-- How many challenges are `pending`, kept by a trigger so that creating a challenge checks the
-- service-wide cap without counting the table (issue 16 item 3). The count is spread over 16
-- rows: each change adds or takes one on a row picked at random, so concurrent transactions
-- rarely wait on the same row lock; only the sum means anything (one row may go negative).
-- Pending rows past their expiry still count until the sweeper marks them `expired`, so the sum
-- is an upper bound on the live pending challenges; the service counts exactly only when the sum
-- reaches the cap.
CREATE TABLE challenge_pending_counts (
    shard INTEGER PRIMARY KEY NOT NULL,
    n     BIGINT NOT NULL
);
INSERT INTO challenge_pending_counts (shard, n) SELECT i, 0 FROM generate_series(0, 15) AS i;
UPDATE challenge_pending_counts SET n = (SELECT COUNT(*) FROM challenges WHERE status = 'pending') WHERE shard = 0;

CREATE FUNCTION challenge_pending_count() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta BIGINT := 0;
    -- Drawn once: random() in the WHERE clause would be drawn again for every row.
    pick INTEGER := floor(random() * 16)::int;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status = 'pending' THEN delta := 1; END IF;
    ELSIF TG_OP = 'DELETE' THEN
        IF OLD.status = 'pending' THEN delta := -1; END IF;
    ELSE
        IF OLD.status = 'pending' AND NEW.status <> 'pending' THEN delta := -1;
        ELSIF OLD.status <> 'pending' AND NEW.status = 'pending' THEN delta := 1;
        END IF;
    END IF;
    IF delta <> 0 THEN
        UPDATE challenge_pending_counts SET n = n + delta WHERE shard = pick;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER challenges_pending_count AFTER INSERT OR DELETE OR UPDATE OF status ON challenges
    FOR EACH ROW EXECUTE FUNCTION challenge_pending_count();
