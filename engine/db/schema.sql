-- The current schema, kept equal to the migration chain in migrations/ (tests/test_migrations.py proves it).
-- New databases and readers of the code start here; upgrades run the migrations.

CREATE TABLE messages (
    id              uuid PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    source          text NOT NULL CHECK (source IN ('smtp', 'http')),
    mail_from       text NOT NULL,                  -- envelope sender; '' is the null sender
    raw             bytea,                          -- byte-exact RFC 5322 message (SMTP, raw REST)
    content         jsonb,                          -- structured REST message (subject, parts, template...)
    stream          text NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    api_key_id      bigint,
    send_at         timestamptz,
    CHECK (raw IS NOT NULL OR content IS NOT NULL)
);

CREATE TABLE recipients (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id          uuid NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    address             text NOT NULL,
    domain              text NOT NULL,
    kind                text NOT NULL DEFAULT 'to' CHECK (kind IN ('to', 'cc', 'bcc', 'envelope')),
    vars                jsonb,
    state               text NOT NULL DEFAULT 'queued' CHECK (state IN (
                            'queued', 'leased', 'deferred', 'delivered', 'bounced',
                            'expired', 'suppressed', 'held')),
    stream              text NOT NULL,
    priority            smallint NOT NULL DEFAULT 5,
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    lease_owner         text,
    lease_expires_at    timestamptz,
    last_code           integer,
    last_status         text,
    last_reply          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- from 0010: who the recipient is in the CRM/CDP (on every event) and why a row was stopped
    contact_id          text,
    external            jsonb,
    reason              text,
    UNIQUE (message_id, address)
);

-- The claim path: only ready rows are indexed, so cost follows the work, not the backlog.
CREATE INDEX recipients_ready_idx ON recipients (priority, next_attempt_at)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX recipients_ready_domain_idx ON recipients (domain, priority, next_attempt_at)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX recipients_lease_idx ON recipients (lease_expires_at) WHERE state = 'leased';
CREATE INDEX recipients_address_idx ON recipients (lower(address));

CREATE TABLE api_keys (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL,                  -- unique among active keys (index below)
    prefix          text NOT NULL,                  -- first characters, shown in listings
    key_hash        bytea NOT NULL UNIQUE,          -- sha256 of the whole key; the key is never stored
    scopes          text[] NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    last_used_at    timestamptz
);

-- A revoked key's name can be reused; revoke by name acts on the one active key.
CREATE UNIQUE INDEX api_keys_active_name_idx ON api_keys (name) WHERE revoked_at IS NULL;

CREATE TABLE idempotency_keys (
    api_key_id      bigint NOT NULL,
    key             text NOT NULL,
    request_hash    bytea NOT NULL,
    status_code     integer NOT NULL,
    response        jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);

-- from 0002_attempts
CREATE TABLE attempts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recipient_id    bigint NOT NULL REFERENCES recipients (id) ON DELETE CASCADE,
    at              timestamptz NOT NULL DEFAULT now(),
    outcome         text NOT NULL CHECK (outcome IN ('delivered', 'deferred', 'bounced', 'expired')),
    code            integer,
    status          text,
    reply           text,
    mx              text,
    duration_ms     integer
);
CREATE INDEX attempts_recipient_idx ON attempts (recipient_id);

-- from 0003_templates_events_suppressions
CREATE TABLE templates (
    name            text NOT NULL,
    version         integer NOT NULL CHECK (version >= 1),
    parts           jsonb NOT NULL,                 -- {"subject": ..., "html": ..., "text": ...}
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by_key  bigint,
    PRIMARY KEY (name, version)
);

CREATE TABLE events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type            text NOT NULL,
    recipient_id    bigint,
    message_id      uuid,
    data            jsonb NOT NULL DEFAULT '{}'::jsonb,   -- versioned payload {"v": 1, ...}
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The writing transaction (from 0009): GET /v1/events and the webhook fan-out page by (tx, id)
    -- below pg_snapshot_xmin(pg_current_snapshot()), so an event that commits late is never skipped.
    tx              xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX events_created_idx ON events (created_at);
CREATE INDEX events_message_idx ON events (message_id);
CREATE INDEX events_cursor_idx ON events (tx, id);
CREATE INDEX events_recipient_idx ON events (recipient_id) WHERE recipient_id IS NOT NULL;

CREATE TABLE suppressions (
    address         text NOT NULL,                  -- wholly lower-cased (engine.suppression.normalize_address)
    scope           text NOT NULL,                  -- a stream name, or '*' for every stream
    reason          text NOT NULL,
    source          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (address, scope)
);

-- from 0004_shaping
-- Token buckets: one row per bucket; workers lease a few tokens per round trip.
CREATE TABLE throttles (
    key             text PRIMARY KEY,               -- e.g. 'rate:<site>|<source>', 'rate:group:google'
    tokens          double precision NOT NULL,
    rate            double precision NOT NULL,      -- tokens per second
    burst           double precision NOT NULL,      -- bucket size
    granted         double precision NOT NULL DEFAULT 0,   -- tokens handed out by the last take
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Connection slots: a worker holds one lease per open connection; a dead worker's leases expire.
CREATE TABLE connection_leases (
    key             text NOT NULL,                  -- 'conn:<site>|<source>' or 'conn:group:<provider>'
    slot            integer NOT NULL CHECK (slot >= 0),
    owner           text NOT NULL,
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (key, slot)
);
CREATE INDEX connection_leases_owner_idx ON connection_leases (owner);

-- Workers that found no free slot: holders shrink to a fair share so no worker starves.
CREATE TABLE connection_waiters (
    key             text NOT NULL,
    owner           text NOT NULL,
    until           timestamptz NOT NULL,
    PRIMARY KEY (key, owner)
);

-- Warm-up ramps: today's count and the current step of each (ramp, source or sending domain).
CREATE TABLE warmup_state (
    key             text PRIMARY KEY,
    step            integer NOT NULL DEFAULT 0,     -- index into the ramp's schedule
    day             date NOT NULL,
    sent            integer NOT NULL DEFAULT 0,     -- units of today's cap handed to workers
    delivered       integer NOT NULL DEFAULT 0,
    failed          integer NOT NULL DEFAULT 0,
    granted         integer NOT NULL DEFAULT 0,
    last_health     text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Destinations a worker suspended after connection failures (for `engine shaping show`).
CREATE TABLE suspensions (
    domain          text PRIMARY KEY,
    until           timestamptz NOT NULL,
    reason          text NOT NULL,
    owner           text NOT NULL
);

-- from 0005_feedback

-- Suppressing an address stops its pending mail (engine.suppression.suppress_pending): only rows
-- that can still be sent are indexed, keyed like suppressions.address (lower-cased).
CREATE INDEX recipients_pending_address_idx ON recipients (lower(address))
    WHERE state IN ('queued', 'deferred', 'held');

-- Rolling reputation windows (engine.outcome.reputation): one row per minute and
-- (provider, source, sending domain, outcome, category), upserted in batches by the outcome writer
-- and the inbound listener; a window is a sum over its buckets.
CREATE TABLE reputation_counters (
    bucket          timestamptz NOT NULL,           -- the minute (date_trunc('minute', ...))
    provider        text NOT NULL,                  -- shaping provider name, else the recipient domain
    source          text NOT NULL DEFAULT '',       -- egress source name; '' when unknown (inbound reports)
    sending_domain  text NOT NULL DEFAULT '',
    outcome         text NOT NULL CHECK (outcome IN ('delivered', 'deferred', 'bounced', 'complained')),
    category        text NOT NULL DEFAULT '',
    n               bigint NOT NULL CHECK (n >= 0),
    PRIMARY KEY (provider, bucket, source, sending_domain, outcome, category)
);
CREATE INDEX reputation_counters_bucket_idx ON reputation_counters (bucket);

-- from 0006_automation
-- Traffic shaping automation (engine.deliver.automation): decisions every worker obeys.

-- One row per (rule, provider, source, campaign): re-firing extends it; history is in events.
CREATE TABLE shaping_decisions (
    rule            text NOT NULL,                  -- rule id, or 'health:complaint_rate' / 'health:bounce_rate'
    provider        text NOT NULL DEFAULT '',       -- shaping provider (group) name
    source          text NOT NULL DEFAULT '',       -- egress source name; '*' = every source
    campaign        text NOT NULL DEFAULT '',       -- hold_campaign: metadata.campaign
    action          text NOT NULL,                  -- suspend | suspend_provider | reduce_rate | cap_connections | hold_campaign | pause_bulk
    params          jsonb NOT NULL DEFAULT '{}'::jsonb,  -- factor, floor, limit, ramp_step, ramp_steps, streams
    reason          text NOT NULL,
    started_at      timestamptz NOT NULL,           -- start of the current episode (first match after quiet)
    expires_at      timestamptz NOT NULL,           -- full action until then; then the ramp
    ramp_until      timestamptz NOT NULL,           -- limits fully back after this
    PRIMARY KEY (rule, provider, source, campaign)
);
CREATE INDEX shaping_decisions_ramp_idx ON shaping_decisions (ramp_until);

-- "N matches per period" counted across workers: one fixed window per (rule, provider, source).
CREATE TABLE shaping_rule_hits (
    rule            text NOT NULL,
    provider        text NOT NULL,
    source          text NOT NULL,
    window_start    timestamptz NOT NULL,
    n               integer NOT NULL,
    PRIMARY KEY (rule, provider, source)
);

-- Final outcomes per campaign and minute, for the hard-bounce-rate hold.
CREATE TABLE campaign_counters (
    campaign        text NOT NULL,
    bucket          timestamptz NOT NULL,
    final           bigint NOT NULL DEFAULT 0,      -- delivered + bounced
    hard            bigint NOT NULL DEFAULT 0,      -- hard bounces (unknown_user, bad_domain)
    PRIMARY KEY (campaign, bucket)
);
CREATE INDEX campaign_counters_bucket_idx ON campaign_counters (bucket);

-- from 0007_workers
-- Live delivery workers (engine.deliver.scheduler): who runs, and which shaping file each applied.

-- One row per worker process, upserted by its lease heartbeat and right after a reload attempt,
-- deleted on clean shutdown; a row not refreshed for a few heartbeats is a dead worker (stale).
CREATE TABLE workers (
    owner               text PRIMARY KEY,               -- host:pid, the lease owner id
    host                text NOT NULL,
    pid                 integer NOT NULL,
    started_at          timestamptz NOT NULL,
    last_seen           timestamptz NOT NULL,           -- database clock: no skew between hosts
    heartbeat_seconds   real NOT NULL,                  -- this worker's heartbeat period (staleness is relative to it)
    shaping_source      text,                           -- path of the shaping file; NULL when shaping is off
    shaping_digest      text,                           -- sha256 of the applied file's bytes; NULL when shaping is off
    shaping_applied_at  timestamptz,
    reload_id           text,                           -- id of the last `engine reload` this worker handled
    reload_error        text,                           -- why that reload was refused; NULL when applied
    delivered           bigint NOT NULL DEFAULT 0
);

-- from 0009_webhooks
CREATE TABLE webhook_endpoints (
    id                  uuid PRIMARY KEY,
    url                 text NOT NULL,
    description         text NOT NULL DEFAULT '',
    event_types         text[],                         -- engine event types (events.type); NULL = all
    streams             text[],                         -- NULL = every stream
    enabled             boolean NOT NULL DEFAULT true,
    disabled_reason     text,
    batch_max           integer NOT NULL DEFAULT 1 CHECK (batch_max BETWEEN 1 AND 1000),
    batch_wait_ms       integer NOT NULL DEFAULT 1000 CHECK (batch_wait_ms BETWEEN 0 AND 60000),
    secret_enc          bytea NOT NULL,                 -- Fernet-encrypted whsec_ secret
    prev_secret_enc     bytea,                          -- the secret before the last rotation...
    prev_secret_until   timestamptz,                    -- ...signed with too until this time
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- One row per (endpoint, event) to send: the webhook outbox. States: pending (due at
-- next_attempt_at), sending (leased by a dispatcher), delivered, failed (dead letter).
CREATE TABLE webhook_deliveries (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,   -- stream order per endpoint
    endpoint_id         uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id            bigint NOT NULL,
    recipient_id        bigint,                          -- order key: one recipient's events in order
    lane                text NOT NULL CHECK (lane IN ('transactional', 'default')),
    state               text NOT NULL DEFAULT 'pending'
                            CHECK (state IN ('pending', 'sending', 'delivered', 'failed')),
    attempts            integer NOT NULL DEFAULT 0,
    event_at            timestamptz NOT NULL,
    next_attempt_at     timestamptz NOT NULL,
    lease_owner         text,
    lease_until         timestamptz,
    last_status         integer,                         -- HTTP status of the last attempt
    last_error          text,
    last_attempt_at     timestamptz,
    delivered_at        timestamptz,
    replay              boolean NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (endpoint_id, lane, next_attempt_at, id)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_order_idx ON webhook_deliveries (endpoint_id, recipient_id, id)
    WHERE state IN ('pending', 'sending') AND recipient_id IS NOT NULL;
CREATE INDEX webhook_deliveries_lease_idx ON webhook_deliveries (lease_until) WHERE state = 'sending';
CREATE INDEX webhook_deliveries_state_idx ON webhook_deliveries (endpoint_id, state, id);
CREATE INDEX webhook_deliveries_done_idx ON webhook_deliveries (delivered_at) WHERE state = 'delivered';

-- Where the fan-out stands in the event stream: one row, locked by the one dispatcher fanning out.
CREATE TABLE webhook_cursor (
    id                  integer PRIMARY KEY CHECK (id = 1),
    tx                  xid8 NOT NULL,
    event_id            bigint NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
-- Start at the head: events written before webhooks existed are history (replay reaches them).
INSERT INTO webhook_cursor (id, tx, event_id)
SELECT 1, coalesce(max(tx), '0'::xid8), coalesce(max(id), 0) FROM events;

-- from 0010_consent
-- The current consent per (address, purpose), derived from consent_history: every change appends
-- there and updates this row in the same statement.
CREATE TABLE consent (
    address             text NOT NULL,                  -- wholly lower-cased
    purpose             text NOT NULL,
    status              text NOT NULL CHECK (status IN ('granted', 'revoked', 'unknown')),
    legal_basis         text,
    source              text NOT NULL,
    captured_at         timestamptz NOT NULL,
    policy_version      text,
    double_opt_in_at    timestamptz,
    evidence            jsonb,
    effective_from      timestamptz,
    effective_until     timestamptz,
    contact_id          text,
    legacy              boolean NOT NULL DEFAULT false,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (address, purpose)
);
CREATE INDEX consent_contact_idx ON consent (contact_id) WHERE contact_id IS NOT NULL;

CREATE TABLE consent_history (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    address             text NOT NULL,
    purpose             text NOT NULL,
    old_status          text,                           -- NULL: the first record for this address and purpose
    status              text NOT NULL,
    legal_basis         text,
    source              text NOT NULL,
    captured_at         timestamptz NOT NULL,
    policy_version      text,
    double_opt_in_at    timestamptz,
    evidence            jsonb,
    effective_from      timestamptz,
    effective_until     timestamptz,
    contact_id          text,
    legacy              boolean NOT NULL DEFAULT false,
    actor               text NOT NULL,                  -- who: api:<key name>, cli, list-unsubscribe, arf, import:<key>
    recorded_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX consent_history_address_idx ON consent_history (address, id);

-- Erased addresses, as salted hashes only: never mailed again, never readable.
CREATE TABLE do_not_mail (
    hash                bytea PRIMARY KEY,              -- sha256(salt || lower(address))
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE do_not_mail_salt (
    id                  integer PRIMARY KEY CHECK (id = 1),
    salt                bytea NOT NULL
);
INSERT INTO do_not_mail_salt (id, salt)
VALUES (1, decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));

-- Events about an address rather than a recipient row (consent changes): found again on erasure.
CREATE INDEX events_address_idx ON events ((data->>'address')) WHERE recipient_id IS NULL;

-- from 0014_export
CREATE TABLE export_state (
    destination         text PRIMARY KEY,               -- the [export] destination kind: 'local' or 's3'
    tx                  xid8 NOT NULL DEFAULT '0',      -- exported through (tx, event_id) in commit order
    event_id            bigint NOT NULL DEFAULT 0,
    pending_tx          xid8,                           -- the batch being written ends here: after a crash
    pending_event_id    bigint,                         -- the same batch is written again, same file names
    leased_by           text,
    lease_until         timestamptz,
    exported            bigint NOT NULL DEFAULT 0,      -- events written so far
    last_file           text,
    last_batch_at       timestamptz,
    last_error          text,
    last_error_at       timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Every batch written, so `engine export backfill` rewrites a past range under the same names.
CREATE TABLE export_batches (
    destination         text NOT NULL,
    start_tx            xid8 NOT NULL,                  -- exclusive
    start_event_id      bigint NOT NULL,
    end_tx              xid8 NOT NULL,                  -- inclusive
    end_event_id        bigint NOT NULL,
    events              integer NOT NULL,
    first_at            timestamptz,
    last_at             timestamptz,
    manifest            text NOT NULL,
    written_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination, end_tx, end_event_id)
);
CREATE INDEX export_batches_time_idx ON export_batches (destination, last_at);

-- from 0011_audit
-- API keys: an optional end of validity (set at create, or by a rotation's grace), an optional
-- allowlist of client networks, and when a rotation replaced the key. A rotated key keeps its
-- name and works until its expires_at; only the one current key of a name (neither revoked nor
-- rotated out) must have a unique name.
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;
ALTER TABLE api_keys ADD COLUMN allow_cidrs cidr[];
ALTER TABLE api_keys ADD COLUMN rotated_at timestamptz;
DROP INDEX api_keys_active_name_idx;
CREATE UNIQUE INDEX api_keys_active_name_idx ON api_keys (name) WHERE revoked_at IS NULL AND rotated_at IS NULL;

-- Every admin action, append-only (engine/audit.py is its only writer). before/after never hold
-- secrets. tx is the writing transaction: GET /v1/audit pages by (tx, id) below the snapshot's
-- xmin, like GET /v1/events, so a row whose transaction commits late is never skipped.
CREATE TABLE audit_log (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    actor           text NOT NULL,                  -- API key name, or cli:<os user>
    actor_key_id    bigint,                         -- the API key's id (NULL for the CLI)
    source_ip       inet,                           -- HTTP client or SMTP peer (NULL for the CLI)
    action          text NOT NULL,                  -- apikey.create, suppression.add, queue.hold, ...
    target          text,
    before          jsonb,
    after           jsonb,
    tx              xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX audit_log_at_idx ON audit_log (at);
CREATE INDEX audit_log_tx_idx ON audit_log (tx, id);

-- Append-only in the database too: no UPDATE, no TRUNCATE, and DELETE only by the retention
-- purge (engine.audit.prune), which says so with SET LOCAL engine.audit_prune = 'on'.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('engine.audit_prune', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP;
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- from 0012_retention
-- Indexes the background purge (engine.retention) walks oldest first, one small batch at a time.
CREATE INDEX recipients_final_idx ON recipients (updated_at)
    WHERE state IN ('delivered', 'bounced', 'expired', 'suppressed');
-- Messages that still hold a body; retention's {"purged": true} and erasure's {"erased": true} leave it.
CREATE INDEX messages_body_idx ON messages (created_at)
    WHERE raw IS NOT NULL OR content NOT IN ('{"erased": true}'::jsonb, '{"purged": true}'::jsonb);
-- Events a webhook delivery still waits to send are kept by the events purge.
CREATE INDEX webhook_deliveries_open_event_idx ON webhook_deliveries (event_id)
    WHERE state IN ('pending', 'sending');

-- from 0016_queue_depth
-- The hot table: vacuum and analyze after a small share of changes (dead versions of claimed and
-- acked rows, a burst of new ones), and leave room on each page for a row's next version.
ALTER TABLE recipients SET (
    autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.01, autovacuum_analyze_threshold = 1000,
    fillfactor = 85
);

-- from 0017_partitions
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
