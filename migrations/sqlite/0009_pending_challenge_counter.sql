-- How many challenges are `pending`, kept by triggers so that creating a challenge checks the
-- service-wide cap without counting the table (issue 16 item 3). The count is spread over 16
-- rows: each change adds or takes one on a row picked at random, so concurrent writers rarely
-- touch the same row; only the sum means anything (one row may go negative). The row is drawn
-- in a scalar subquery, evaluated once (random() in the WHERE clause itself would be drawn again
-- for every row). Pending rows past their expiry still count until the sweeper marks them `expired`, so the sum is an upper bound
-- on the live pending challenges; the service counts exactly only when the sum reaches the cap.
CREATE TABLE challenge_pending_counts (
    shard INTEGER PRIMARY KEY NOT NULL,
    n     INTEGER NOT NULL
);
INSERT INTO challenge_pending_counts (shard, n)
    WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < 15)
    SELECT i, 0 FROM s;
UPDATE challenge_pending_counts SET n = (SELECT COUNT(*) FROM challenges WHERE status = 'pending') WHERE shard = 0;

CREATE TRIGGER challenges_pending_insert AFTER INSERT ON challenges
    WHEN NEW.status = 'pending'
BEGIN
    UPDATE challenge_pending_counts SET n = n + 1 WHERE shard = (SELECT abs(random() % 16));
END;

CREATE TRIGGER challenges_pending_leave AFTER UPDATE OF status ON challenges
    WHEN OLD.status = 'pending' AND NEW.status <> 'pending'
BEGIN
    UPDATE challenge_pending_counts SET n = n - 1 WHERE shard = (SELECT abs(random() % 16));
END;

CREATE TRIGGER challenges_pending_enter AFTER UPDATE OF status ON challenges
    WHEN OLD.status <> 'pending' AND NEW.status = 'pending'
BEGIN
    UPDATE challenge_pending_counts SET n = n + 1 WHERE shard = (SELECT abs(random() % 16));
END;

CREATE TRIGGER challenges_pending_delete AFTER DELETE ON challenges
    WHEN OLD.status = 'pending'
BEGIN
    UPDATE challenge_pending_counts SET n = n - 1 WHERE shard = (SELECT abs(random() % 16));
END;
