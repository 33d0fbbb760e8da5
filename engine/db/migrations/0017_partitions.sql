-- events and attempts partitioned by day (UTC), so retention drops a whole day instead of
-- deleting its rows (engine.retention; see the README's "Retention" section).
--
-- Day partitions are named <table>_pYYYYMMDD and cover [day, day + 1) in UTC. A DEFAULT partition
-- is the safety net: a row for a day without a partition (a stopped maintainer, a clock jump, an
-- explicit old timestamp) still goes in, never failing the outbox's transaction. The engine's
-- housekeeping creates the partitions of today and the next days ahead (engine.db.partitions).
-- The primary keys include the partition key, as Postgres requires: ids stay unique by their
-- identity sequence (nothing references events(id) or attempts(id) by foreign key).

-- Creates the day partition of `events` or `attempts` holding `day` (UTC), unless it exists;
-- true when created. Rows of that day already in the default partition move into it first, so
-- they never block the attach. Built as a plain table and attached while writers of the table
-- wait (a moment: the new table is empty or holds only the moved rows); serialised across
-- engines by an advisory lock; waits at most 5 s for a lock, so it never queues writers behind a
-- long transaction for longer (a failure is retried on the next pass: partitions are made days ahead).
CREATE FUNCTION engine_partition_create(parent text, day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := parent || '_p' || to_char(day, 'YYYYMMDD');
    dflt text := parent || '_default';
    pkey text := CASE parent WHEN 'events' THEN 'created_at' WHEN 'attempts' THEN 'at' END;
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF pkey IS NULL THEN
        RAISE EXCEPTION 'not a day-partitioned table: %', parent;
    END IF;
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    PERFORM set_config('lock_timeout', '5s', true);
    PERFORM pg_advisory_xact_lock(7020673410420);  -- this key: partition maintenance only
    -- Another engine may have made it while we waited: asked of pg_class by a query (its own
    -- snapshot), since taking an advisory lock does not refresh what to_regclass() sees.
    IF EXISTS (SELECT 1 FROM pg_class WHERE relname = part AND relnamespace = current_schema()::regnamespace) THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part, parent);
    IF parent = 'attempts' THEN  -- the attach adds a foreign key: lock recipients first, in the
        LOCK TABLE recipients IN SHARE ROW EXCLUSIVE MODE;  -- order the outbox does (no deadlock)
    END IF;
    -- Writers wait for the attach, and the attach for writers in flight: an insert routed with
    -- the partitions it saw before the attach would fail in the default partition's new constraint.
    EXECUTE format('LOCK TABLE %I IN SHARE MODE', parent);
    EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', dflt);
    EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= $1 AND %I < $2 RETURNING *) '
                   'INSERT INTO %I SELECT * FROM moved', dflt, pkey, pkey, part) USING lo, hi;
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', parent, part, lo, hi);
    RETURN true;
END
$$;

-- Drops the day partition of `events` or `attempts` holding `day`; false when there is none.
-- DETACH ... CONCURRENTLY is not allowed on a table with a default partition, so this is a plain
-- DETACH + DROP: an ACCESS EXCLUSIVE lock on the parent for a moment, waited for at most 5 s.
CREATE FUNCTION engine_partition_drop(parent text, day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := parent || '_p' || to_char(day, 'YYYYMMDD');
BEGIN
    IF parent NOT IN ('events', 'attempts') THEN
        RAISE EXCEPTION 'not a day-partitioned table: %', parent;
    END IF;
    PERFORM set_config('lock_timeout', '5s', true);
    PERFORM pg_advisory_xact_lock(7020673410420);
    IF NOT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                   WHERE c.relname = part AND c.relnamespace = current_schema()::regnamespace
                     AND i.inhparent = parent::regclass) THEN
        RETURN false;
    END IF;
    IF parent = 'attempts' THEN  -- as in engine_partition_create: recipients first
        LOCK TABLE recipients IN SHARE ROW EXCLUSIVE MODE;
    END IF;
    EXECUTE format('ALTER TABLE %I DETACH PARTITION %I', parent, part);
    EXECUTE format('DROP TABLE %I', part);
    RETURN true;
END
$$;

-- The existing tables become the source of a copy: their ids keep counting from where they were.
ALTER TABLE events RENAME TO events_0016;
ALTER TABLE events_0016 DROP CONSTRAINT events_pkey;
DROP INDEX events_created_idx, events_message_idx, events_cursor_idx, events_recipient_idx, events_address_idx;
ALTER TABLE attempts RENAME TO attempts_0016;
ALTER TABLE attempts_0016 DROP CONSTRAINT attempts_pkey;
ALTER TABLE attempts_0016 DROP CONSTRAINT attempts_recipient_id_fkey;
DROP INDEX attempts_recipient_idx;
CREATE TEMP TABLE engine_0017_next_ids ON COMMIT DROP AS
SELECT 'events' AS parent, nextval(pg_get_serial_sequence('events_0016', 'id')) AS next_id
UNION ALL
SELECT 'attempts', nextval(pg_get_serial_sequence('attempts_0016', 'id'));
ALTER TABLE events_0016 ALTER COLUMN id DROP IDENTITY;
ALTER TABLE attempts_0016 ALTER COLUMN id DROP IDENTITY;

CREATE TABLE events (
    id              bigint GENERATED ALWAYS AS IDENTITY,
    type            text NOT NULL,
    recipient_id    bigint,
    message_id      uuid,
    data            jsonb NOT NULL DEFAULT '{}'::jsonb,   -- versioned payload {"v": 1, ...}
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The writing transaction: GET /v1/events and the webhook fan-out page by (tx, id) below
    -- pg_snapshot_xmin(pg_current_snapshot()), so an event that commits late is never skipped.
    tx              xid8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE INDEX events_created_idx ON events (created_at);
CREATE INDEX events_message_idx ON events (message_id);
CREATE INDEX events_cursor_idx ON events (tx, id);
CREATE INDEX events_recipient_idx ON events (recipient_id) WHERE recipient_id IS NOT NULL;
-- Events about an address rather than a recipient row (consent changes): found again on erasure.
CREATE INDEX events_address_idx ON events ((data->>'address')) WHERE recipient_id IS NULL;

CREATE TABLE attempts (
    id              bigint GENERATED ALWAYS AS IDENTITY,
    recipient_id    bigint NOT NULL REFERENCES recipients (id) ON DELETE CASCADE,
    at              timestamptz NOT NULL DEFAULT now(),
    outcome         text NOT NULL CHECK (outcome IN ('delivered', 'deferred', 'bounced', 'expired')),
    code            integer,
    status          text,
    reply           text,
    mx              text,
    duration_ms     integer,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
CREATE TABLE attempts_default PARTITION OF attempts DEFAULT;
CREATE INDEX attempts_recipient_idx ON attempts (recipient_id);

-- Old rows go into day partitions of their own days, then the old tables go.
SELECT engine_partition_create('events', d)
FROM (SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date AS d FROM events_0016) days ORDER BY d;
SELECT engine_partition_create('attempts', d)
FROM (SELECT DISTINCT (at AT TIME ZONE 'UTC')::date AS d FROM attempts_0016) days ORDER BY d;
INSERT INTO events (id, type, recipient_id, message_id, data, created_at, tx) OVERRIDING SYSTEM VALUE
SELECT id, type, recipient_id, message_id, data, created_at, tx FROM events_0016;
INSERT INTO attempts (id, recipient_id, at, outcome, code, status, reply, mx, duration_ms) OVERRIDING SYSTEM VALUE
SELECT id, recipient_id, at, outcome, code, status, reply, mx, duration_ms FROM attempts_0016;
DROP TABLE events_0016;
DROP TABLE attempts_0016;
SELECT setval(pg_get_serial_sequence(parent, 'id'), next_id, false) FROM engine_0017_next_ids;
