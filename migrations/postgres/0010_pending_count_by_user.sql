-- The pending-challenge counter of 0009 picked one of 16 rows at random for every change, so two
-- users' transactions shared a counter row (locked until commit) about one time in 16: under the
-- realistic login load (issue 16, sc004) 90 challenge inserts/updates waited more than 1 s on it.
-- Now 256 rows and the row is chosen by the user: a user's changes always go to the same row
-- (they are serialised by the user's lock anyway), and two users share a row only when their ids
-- hash alike (1 in 256), as their audit partitions do. Only the sum means anything, as before.
INSERT INTO challenge_pending_counts (shard, n) SELECT i, 0 FROM generate_series(16, 255) AS i;

CREATE OR REPLACE FUNCTION challenge_pending_count() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta BIGINT := 0;
    pick INTEGER;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status = 'pending' THEN delta := 1; END IF;
        pick := (hashtextextended(NEW.user_id, 0) & 255)::int;
    ELSIF TG_OP = 'DELETE' THEN
        IF OLD.status = 'pending' THEN delta := -1; END IF;
        pick := (hashtextextended(OLD.user_id, 0) & 255)::int;
    ELSE
        IF OLD.status = 'pending' AND NEW.status <> 'pending' THEN delta := -1;
        ELSIF OLD.status <> 'pending' AND NEW.status = 'pending' THEN delta := 1;
        END IF;
        pick := (hashtextextended(NEW.user_id, 0) & 255)::int;
    END IF;
    IF delta <> 0 THEN
        UPDATE challenge_pending_counts SET n = n + delta WHERE shard = pick;
    END IF;
    RETURN NULL;
END;
$$;
