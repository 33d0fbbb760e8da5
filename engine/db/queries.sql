-- Every SQL statement the engine runs, as named blocks. Python calls them by name
-- (engine.db.queries); ":name" placeholders become asyncpg's $n in one place.

-- name: enqueue
-- Messages and their recipient rows in one statement (one round trip per group commit), plus the
-- wake-up hint for idle workers when something is ready (an uncorrelated subquery: evaluated once).
-- The foreign key from recipients to messages is checked at the end of the statement, after both.
-- With :check_suppressions (accept's policy) a queued recipient starts as 'suppressed', with its
-- reason, when: its address was erased (do-not-mail hash); it is on the suppression list for its
-- stream (or every stream); or its consent fails its stream's rule (:purposes/:rules per recipient,
-- NULL = not checked). :lowered holds the keys, lower-cased in Python.
WITH m AS (
    INSERT INTO messages (id, source, mail_from, raw, content, stream, metadata, api_key_id, send_at)
    SELECT * FROM unnest(:ids::uuid[], :sources::text[], :mail_froms::text[], :raws::bytea[],
                         :contents::jsonb[], :streams::text[], :metadatas::jsonb[],
                         :api_key_ids::bigint[], :send_ats::timestamptz[])
), salt AS (
    SELECT salt FROM do_not_mail_salt WHERE id = 1
), ins AS (
    INSERT INTO recipients (message_id, address, domain, kind, vars, state, reason, stream, priority,
                            next_attempt_at, expires_at, contact_id, external)
    SELECT u.message_id, u.address, u.domain, u.kind, u.vars,
           CASE WHEN j.blocked IS NOT NULL THEN 'suppressed' ELSE u.state END,
           coalesce(j.blocked, u.reason),
           u.stream, u.priority,
           coalesce(u.next_attempt_at, now()), coalesce(u.next_attempt_at, now()) + make_interval(secs => :max_age),
           u.contact_id, u.external
    FROM unnest(:message_ids::uuid[], :addresses::text[], :lowered::text[], :domains::text[], :kinds::text[],
                :vars::jsonb[], :states::text[], :reasons::text[], :rcpt_streams::text[], :priorities::smallint[],
                :next_attempt_ats::timestamptz[], :contact_ids::text[], :externals::jsonb[],
                :purposes::text[], :rules::text[])
         AS u(message_id, address, lowered, domain, kind, vars, state, reason, stream, priority, next_attempt_at,
              contact_id, external, purpose, rule)
    CROSS JOIN LATERAL (
        SELECT CASE
            WHEN NOT :check_suppressions::boolean OR u.state <> 'queued' THEN NULL
            WHEN EXISTS (SELECT 1 FROM do_not_mail d, salt
                         WHERE d.hash = sha256(salt.salt || convert_to(u.lowered, 'UTF8'))) THEN 'erased'
            WHEN EXISTS (SELECT 1 FROM suppressions s
                         WHERE s.address = u.lowered AND (s.scope = u.stream OR s.scope = '*')) THEN 'suppressed'
            WHEN u.rule = 'granted' AND NOT EXISTS (
                    SELECT 1 FROM consent c
                    WHERE c.address = u.lowered AND c.purpose = u.purpose AND c.status = 'granted'
                      AND (c.effective_from IS NULL OR c.effective_from <= now())
                      AND (c.effective_until IS NULL OR c.effective_until > now())
                      AND NOT (c.legacy AND :require_reconfirm::boolean)) THEN 'consent:' || u.purpose
            WHEN u.rule = 'not_revoked' AND EXISTS (
                    SELECT 1 FROM consent c
                    WHERE c.address = u.lowered AND c.purpose = u.purpose AND c.status = 'revoked'
                      AND (c.effective_from IS NULL OR c.effective_from <= now())
                      AND (c.effective_until IS NULL OR c.effective_until > now())) THEN 'consent:' || u.purpose
        END AS blocked
    ) j
    RETURNING id, message_id, address, state, reason
)
SELECT ins.id, ins.message_id, ins.address, ins.state, ins.reason,
       (SELECT pg_notify('engine_outbox', '') WHERE :notify::boolean) AS notified
FROM ins;

-- name: claim
-- One statement picks ready rows with SKIP LOCKED and leases them, so many
-- workers on many hosts share the outbox without stepping on each other.
-- Consent is judged again here (:rule_streams/:rule_purposes/:rule_kinds, the stream rules):
-- a row whose consent was revoked after accept becomes 'suppressed' instead of leased, and is
-- returned with its reason ('blocked') so the caller records the event in the same transaction.
-- With :skip_domains (destinations the worker cannot take more of), 'open' first walks the
-- distinct waiting domains on recipients_ready_domain_idx, one index probe per domain, jumping
-- over skipped ones and ones with nothing due: when no other domain has a due row, the claim
-- returns nothing without reading the ready set (before, it read every waiting row of the
-- skipped domains: a full scan of a 1M queue each time a worker's destination queue was full).
WITH RECURSIVE walk(domain) AS (
    SELECT min(domain) FROM recipients
    WHERE state IN ('queued', 'deferred') AND cardinality(:skip_domains::text[]) > 0
  UNION ALL
    SELECT (SELECT min(r.domain) FROM recipients r WHERE r.state IN ('queued', 'deferred') AND r.domain > w.domain)
    FROM walk w
    WHERE w.domain IS NOT NULL AND (w.domain = ANY(:skip_domains::text[]) OR NOT EXISTS (
        SELECT 1 FROM recipients x
        WHERE x.state IN ('queued', 'deferred') AND x.domain = w.domain AND x.next_attempt_at <= now()))
), open AS (
    SELECT 1 FROM walk WHERE domain IS NOT NULL AND domain <> ALL(:skip_domains::text[]) LIMIT 1
), picked AS (
    SELECT id FROM recipients
    WHERE state IN ('queued', 'deferred') AND next_attempt_at <= now()
      AND domain <> ALL(:skip_domains::text[])
      AND (cardinality(:skip_domains::text[]) = 0 OR EXISTS (SELECT 1 FROM open))
    ORDER BY priority, next_attempt_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
), judged AS (
    SELECT p.id, (
        SELECT 'consent:' || ru.purpose
        FROM unnest(:rule_streams::text[], :rule_purposes::text[], :rule_kinds::text[]) AS ru(stream, purpose, kind)
        WHERE ru.stream = r.stream AND CASE ru.kind
            WHEN 'granted' THEN NOT EXISTS (
                SELECT 1 FROM consent c
                WHERE c.address = lower(r.address) AND c.purpose = ru.purpose AND c.status = 'granted'
                  AND (c.effective_from IS NULL OR c.effective_from <= now())
                  AND (c.effective_until IS NULL OR c.effective_until > now())
                  AND NOT (c.legacy AND :require_reconfirm::boolean))
            WHEN 'not_revoked' THEN EXISTS (
                SELECT 1 FROM consent c
                WHERE c.address = lower(r.address) AND c.purpose = ru.purpose AND c.status = 'revoked'
                  AND (c.effective_from IS NULL OR c.effective_from <= now())
                  AND (c.effective_until IS NULL OR c.effective_until > now()))
            ELSE false END
        LIMIT 1
    ) AS blocked
    FROM picked p JOIN recipients r ON r.id = p.id
)
UPDATE recipients r
SET state = CASE WHEN j.blocked IS NULL THEN 'leased' ELSE 'suppressed' END,
    reason = coalesce(j.blocked, r.reason),
    last_reply = CASE WHEN j.blocked IS NULL THEN r.last_reply ELSE 'suppressed: ' || j.blocked END,
    lease_owner = CASE WHEN j.blocked IS NULL THEN :owner END,
    lease_expires_at = CASE WHEN j.blocked IS NULL THEN now() + make_interval(secs => :lease_seconds) END,
    updated_at = now()
FROM judged j
WHERE r.id = j.id
RETURNING r.id, r.message_id, r.address, r.domain, r.kind, r.vars, r.stream, r.priority,
          r.attempts, r.expires_at, r.created_at, r.contact_id, j.blocked;

-- name: ack
-- Final outcomes (delivered, bounced, expired, suppressed) for leased rows, in one batch.
-- Only rows this owner still holds change; the caller records an event for each row returned.
UPDATE recipients r
SET state = u.state, attempts = r.attempts + u.attempted, last_code = u.code, last_status = u.status,
    last_reply = u.reply, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(:ids::bigint[], :states::text[], :attempted::int[], :codes::int[], :statuses::text[],
            :replies::text[]) AS u(id, state, attempted, code, status, reply)
WHERE r.id = u.id AND r.state = 'leased' AND r.lease_owner = :owner
RETURNING r.id, r.message_id;

-- name: defer
-- Temporary failures: back to the ready set at a later time, in one batch.
UPDATE recipients r
SET state = 'deferred', attempts = r.attempts + u.attempted, next_attempt_at = u.next_attempt_at,
    last_code = u.code, last_status = u.status, last_reply = u.reply,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(:ids::bigint[], :next_attempt_ats::timestamptz[], :attempted::int[], :codes::int[],
            :statuses::text[], :replies::text[]) AS u(id, next_attempt_at, attempted, code, status, reply)
WHERE r.id = u.id AND r.state = 'leased' AND r.lease_owner = :owner
RETURNING r.id, r.message_id, r.attempts;

-- name: release
-- Give leased rows back untouched (graceful shutdown): no attempt is counted.
UPDATE recipients
SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
WHERE id = ANY(:ids::bigint[]) AND state = 'leased' AND lease_owner = :owner
RETURNING id;

-- name: extend_leases
-- Heartbeat: a live worker keeps the rows it knows it holds; only a dead worker's leases run out.
-- By id, not by owner alone: rows whose claim reply was lost are the owner's in the table but
-- unknown to it, and must run out and be reclaimed rather than be renewed forever.
UPDATE recipients SET lease_expires_at = now() + make_interval(secs => :lease_seconds)
WHERE id = ANY(:ids::bigint[]) AND state = 'leased' AND lease_owner = :owner;

-- name: reclaim_expired_leases
-- Leases of dead workers run out; their rows become ready again.
UPDATE recipients
SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
WHERE id IN (SELECT id FROM recipients WHERE state = 'leased' AND lease_expires_at < now()
             LIMIT :limit FOR UPDATE SKIP LOCKED)
RETURNING id;

-- name: get_message
SELECT id, created_at, source, mail_from, stream, metadata, send_at,
       (raw IS NOT NULL) AS is_raw, octet_length(raw) AS raw_size, content
FROM messages WHERE id = :id;

-- name: get_message_recipients
SELECT id, address, kind, state, attempts, next_attempt_at, last_code, last_status, last_reply,
       updated_at
FROM recipients WHERE message_id = :id ORDER BY id;

-- name: get_messages_for_delivery
SELECT id, source, mail_from, raw, content, stream, metadata FROM messages WHERE id = ANY(:ids::uuid[]);

-- name: insert_attempts
INSERT INTO attempts (recipient_id, outcome, code, status, reply, mx, duration_ms)
SELECT * FROM unnest(:recipient_ids::bigint[], :outcomes::text[], :codes::int[], :statuses::text[],
                     :replies::text[], :mxs::text[], :durations::int[]);

-- name: get_attempts
SELECT a.recipient_id, a.at, a.outcome, a.code, a.status, a.reply, a.mx, a.duration_ms
FROM attempts a JOIN recipients r ON r.id = a.recipient_id
WHERE r.message_id = :id ORDER BY a.id;

-- name: get_message_raw
SELECT raw FROM messages WHERE id = :id;

-- name: queue_stats
-- Exact: reads every row (Outbox.stats uses it on small tables, or when asked).
SELECT state, stream, domain, count(*)::bigint AS n,
       min(next_attempt_at) FILTER (WHERE state IN ('queued', 'deferred')) AS next_attempt_at,
       false AS estimate
FROM recipients GROUP BY state, stream, domain ORDER BY state, stream, domain;

-- name: queue_list
SELECT r.id, r.message_id, r.address, r.domain, r.stream, r.state, r.attempts, r.next_attempt_at,
       r.last_reply, r.created_at
FROM recipients r
WHERE (:state::text IS NULL OR r.state = :state) AND (:domain::text IS NULL OR r.domain = :domain)
  AND (:message_id::uuid IS NULL OR r.message_id = :message_id)
ORDER BY r.id LIMIT :limit;

-- name: queue_retry
-- Deferred (or queued) rows become ready now: ops override of the backoff.
UPDATE recipients SET next_attempt_at = now(), updated_at = now()
WHERE state IN ('queued', 'deferred') AND (:domain::text IS NULL OR domain = :domain)
  AND (:message_id::uuid IS NULL OR message_id = :message_id)
RETURNING id;

-- name: queue_hold
UPDATE recipients SET state = 'held', updated_at = now()
WHERE state IN ('queued', 'deferred') AND (:domain::text IS NULL OR domain = :domain)
  AND (:message_id::uuid IS NULL OR message_id = :message_id)
RETURNING id, message_id, stream;

-- name: queue_release
-- Released rows go back to their schedule: a future send_at still holds them, else they are ready now
-- (GREATEST ignores a NULL send_at).
UPDATE recipients r SET state = CASE WHEN r.attempts = 0 THEN 'queued' ELSE 'deferred' END,
       next_attempt_at = GREATEST(now(), m.send_at), updated_at = now()
FROM messages m
WHERE m.id = r.message_id AND r.state = 'held' AND (:domain::text IS NULL OR r.domain = :domain)
  AND (:message_id::uuid IS NULL OR r.message_id = :message_id)
RETURNING r.id, r.message_id, r.stream;

-- name: queue_purge
-- Final, but kept for the record: purged rows end as bounced with the operator's reason.
UPDATE recipients SET state = 'bounced', last_code = NULL, last_status = '5.0.0',
       last_reply = '5.0.0 purged by operator', updated_at = now()
WHERE state IN ('queued', 'deferred', 'held') AND state = ANY(:states::text[])
  AND (:domain::text IS NULL OR domain = :domain)
  AND (:message_id::uuid IS NULL OR message_id = :message_id)
RETURNING id, message_id, stream;

-- name: insert_api_key
INSERT INTO api_keys (name, prefix, key_hash, scopes, allow_cidrs, expires_at)
VALUES (:name, :prefix, :key_hash, :scopes, :allow_cidrs, :expires_at)
RETURNING id, created_at;

-- name: list_api_keys
SELECT id, name, prefix, scopes, created_at, revoked_at, last_used_at, expires_at, allow_cidrs, rotated_at
FROM api_keys ORDER BY id;

-- name: revoke_api_key
-- Every key of the name that still works: the current one and any rotated out but still in grace.
UPDATE api_keys SET revoked_at = now()
WHERE name = :name AND revoked_at IS NULL AND (rotated_at IS NULL OR expires_at > now())
RETURNING id, scopes, expires_at, allow_cidrs::text[] AS allow, rotated_at;

-- name: find_api_key
-- Expiry is checked here and again by the caller on every cache hit (engine.apikeys).
SELECT id, name, scopes, expires_at, allow_cidrs FROM api_keys
WHERE key_hash = :key_hash AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now());

-- name: touch_api_key
UPDATE api_keys SET last_used_at = now() WHERE id = :id;

-- name: idempotency_purge_one
DELETE FROM idempotency_keys
WHERE api_key_id = :api_key_id AND key = :key AND created_at < now() - make_interval(secs => :ttl);

-- name: idempotency_claim
INSERT INTO idempotency_keys (api_key_id, key, request_hash, status_code, response)
VALUES (:api_key_id, :key, :request_hash, 0, 'null'::jsonb)
ON CONFLICT DO NOTHING RETURNING key;

-- name: idempotency_get
-- The stored answer as JSON text: a replay sends it as it is, never decoding a large answer.
SELECT request_hash, status_code, response::text AS response FROM idempotency_keys
WHERE api_key_id = :api_key_id AND key = :key;

-- name: idempotency_store
-- The answer already serialised (a large batch builds it slice by slice, as JSON text).
UPDATE idempotency_keys SET status_code = :status_code, response = (:response::text)::jsonb
WHERE api_key_id = :api_key_id AND key = :key;

-- name: idempotency_expire
DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => :ttl);

-- name: ping
SELECT 1;

-- name: schema_versions
-- Applied migrations, oldest first (``engine migrate`` prints them).
SELECT version, name, applied_at FROM schema_migrations ORDER BY version;

-- ==== templates, events, suppressions ====

-- name: template_insert_next
-- The next version of a template. Two uploads of one name at the same instant collide on the
-- primary key; the caller retries, so versions stay dense and never change once written.
INSERT INTO templates (name, version, parts, created_by_key)
SELECT :name::text, coalesce(max(version), 0) + 1, :parts::jsonb, :created_by_key::bigint
FROM templates WHERE name = :name
RETURNING version, created_at;

-- name: template_latest_all
-- Startup: the latest version of every template fills the in-memory mirror.
SELECT DISTINCT ON (name) name, version, parts FROM templates ORDER BY name, version DESC;

-- name: template_max_versions
SELECT name, max(version) AS version FROM templates GROUP BY name;

-- name: template_latest_versions
SELECT name, max(version) AS version FROM templates WHERE name = ANY(:names::text[]) GROUP BY name;

-- name: template_get_versions
SELECT t.name, t.version, t.parts
FROM templates t
JOIN unnest(:names::text[], :versions::int[]) AS u(name, version)
  ON t.name = u.name AND t.version = u.version;

-- name: template_list
SELECT name, max(version) AS latest_version, count(*)::int AS versions, max(created_at) AS updated_at
FROM templates GROUP BY name ORDER BY name;

-- name: template_versions
SELECT version, created_at, created_by_key FROM templates WHERE name = :name ORDER BY version;

-- name: template_get
SELECT name, version, parts, created_at, created_by_key FROM templates
WHERE name = :name AND version = :version;

-- name: events_insert
-- Batched event log writes (one statement per batch); data is a versioned payload {"v": 1, ...}.
-- An event's time is when its row is written (clock_timestamp), not when its transaction began:
-- a 1,000-message accept transaction would otherwise date its events from before its own work,
-- and every lag measured from them (webhooks, exports) would count the transaction's length.
INSERT INTO events (type, recipient_id, message_id, data, created_at)
SELECT u.type, u.recipient_id, u.message_id, u.data, coalesce(u.created_at, clock_timestamp())
FROM unnest(:types::text[], :recipient_ids::bigint[], :message_ids::uuid[], :datas::jsonb[],
            :created_ats::timestamptz[]) AS u(type, recipient_id, message_id, data, created_at);

-- name: event_insert_for_recipient
-- One event for a recipient row, its message id looked up in the same statement; nothing is
-- written when the row no longer exists (a purged message's late open).
INSERT INTO events (type, recipient_id, message_id, data, created_at)
SELECT :type::text, r.id, r.message_id, :data::jsonb, clock_timestamp() FROM recipients r WHERE r.id = :recipient_id
RETURNING id;

-- name: event_exists_for_recipient
SELECT EXISTS (SELECT 1 FROM events
               WHERE message_id = :message_id AND recipient_id = :recipient_id AND type = :type);

-- name: events_for_message
SELECT id, type, recipient_id, message_id, data, created_at FROM events
WHERE message_id = :message_id ORDER BY id;

-- name: events_page
-- A page of the commit-ordered stream after (:tx, :id). Only transactions below the snapshot's
-- xmin have all ended, and every transaction still to commit has an xid at or above it: a reader
-- that stops there never passes an event that commits late (ids alone would). The joins give the
-- public payload its recipient address, stream and metadata.
SELECT e.id, e.tx::text::bigint AS tx, e.type, e.recipient_id, e.message_id, e.data, e.created_at,
       r.address, coalesce(e.data->>'stream', r.stream, m.stream) AS stream, m.metadata, r.attempts,
       r.contact_id, r.external
FROM events e
LEFT JOIN recipients r ON r.id = e.recipient_id
LEFT JOIN messages m ON m.id = e.message_id
WHERE (e.tx, e.id) > (:tx::text::xid8, :id::bigint)
  AND e.tx < pg_snapshot_xmin(pg_current_snapshot())
  AND e.type = ANY(:types::text[])
  AND (:stream::text IS NULL OR coalesce(e.data->>'stream', r.stream, m.stream) = :stream)
  AND (:message_id::uuid IS NULL OR e.message_id = :message_id)
  AND (:recipient_id::bigint IS NULL OR e.recipient_id = :recipient_id)
  AND (:address::text IS NULL OR lower(r.address) = :address)
ORDER BY e.tx, e.id
LIMIT :limit;

-- name: events_by_ids
-- Events in public form by id (webhook payloads, replays); same joins as events_page.
SELECT e.id, e.tx::text::bigint AS tx, e.type, e.recipient_id, e.message_id, e.data, e.created_at,
       r.address, coalesce(e.data->>'stream', r.stream, m.stream) AS stream, m.metadata, r.attempts,
       r.contact_id, r.external
FROM events e
LEFT JOIN recipients r ON r.id = e.recipient_id
LEFT JOIN messages m ON m.id = e.message_id
WHERE e.id = ANY(:ids::bigint[]);

-- name: tracking_recipient
-- What a click or unsubscribe needs: the recipient row and its message's content.
SELECT r.id, r.message_id, r.address, r.vars, r.stream, r.contact_id, m.mail_from, (m.raw IS NOT NULL) AS is_raw,
       m.content, m.metadata
FROM recipients r JOIN messages m ON m.id = r.message_id
WHERE r.id = :recipient_id;

-- name: suppression_add
INSERT INTO suppressions (address, scope, reason, source) VALUES (:address, :scope, :reason, :source)
ON CONFLICT (address, scope) DO NOTHING
RETURNING created_at;

-- name: suppression_remove
-- scope NULL removes the address from every scope.
DELETE FROM suppressions WHERE address = :address AND (:scope::text IS NULL OR scope = :scope)
RETURNING scope;

-- name: suppression_match
-- Which (address, stream) pairs of a whole submission are suppressed, in one statement.
SELECT DISTINCT u.address, u.stream
FROM unnest(:addresses::text[], :streams::text[]) AS u(address, stream)
JOIN suppressions s ON s.address = u.address AND (s.scope = u.stream OR s.scope = '*');

-- name: suppression_list
SELECT address, scope, reason, source, created_at FROM suppressions
WHERE (:address::text IS NULL OR address = :address)
ORDER BY created_at DESC, address, scope
LIMIT :limit;

-- name: suppression_page
-- Keyset pages in (address, scope) order (the primary key) for the export: each page costs what
-- it returns, however many suppressions there are, and a full walk sees every row once.
SELECT address, scope, reason, source, created_at FROM suppressions
WHERE (address, scope) > (:after_address::text, :after_scope::text)
  AND (:address::text IS NULL OR address = :address)
ORDER BY address, scope
LIMIT :limit;

-- ==== shaping ====

-- name: throttle_take
-- Refill a token bucket by the time since its last take (Postgres' clock, the same for every host)
-- and hand out up to :want whole tokens in one statement. granted = 0 means empty: the caller waits
-- (1 - tokens) / rate seconds. The caller's rate and burst win, so a reload takes effect at once.
INSERT INTO throttles AS t (key, tokens, rate, burst, granted, updated_at)
VALUES (:key, :burst::float8 - least(:want::float8, floor(:burst::float8)), :rate::float8, :burst::float8,
        least(:want::float8, floor(:burst::float8)), clock_timestamp())
ON CONFLICT (key) DO UPDATE SET
    granted = least(:want::float8, floor(least(:burst::float8,
                  t.tokens + t.rate * extract(epoch FROM clock_timestamp() - t.updated_at)::float8))),
    tokens = least(:burst::float8, t.tokens + t.rate * extract(epoch FROM clock_timestamp() - t.updated_at)::float8)
             - least(:want::float8, floor(least(:burst::float8,
                  t.tokens + t.rate * extract(epoch FROM clock_timestamp() - t.updated_at)::float8))),
    rate = :rate::float8, burst = :burst::float8, updated_at = clock_timestamp()
RETURNING granted, tokens, rate;

-- name: throttle_state
SELECT key, rate, burst,
       least(burst, tokens + rate * extract(epoch FROM clock_timestamp() - updated_at)::float8) AS tokens,
       updated_at
FROM throttles WHERE key = ANY(:keys::text[]) OR :all::boolean ORDER BY key;

-- name: connection_lease_acquire
-- The lowest free slot below :limit (free = absent or expired). Two workers racing for one slot:
-- the loser's insert conflicts, its update finds the lease live, and it gets no row (tries later).
INSERT INTO connection_leases AS l (key, slot, owner, expires_at)
SELECT :key::text, s, :owner::text, clock_timestamp() + make_interval(secs => :ttl)
FROM generate_series(0, :limit::int - 1) AS s
WHERE NOT EXISTS (SELECT 1 FROM connection_leases c
                  WHERE c.key = :key AND c.slot = s AND c.expires_at > clock_timestamp())
ORDER BY s LIMIT 1
ON CONFLICT (key, slot) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
    WHERE l.expires_at <= clock_timestamp()
RETURNING slot;

-- name: connection_lease_renew
-- Keep this worker's live leases; a slot at or above its key's current limit (lowered by a reload)
-- is not renewed, so the caller gives it up.
UPDATE connection_leases l SET expires_at = clock_timestamp() + make_interval(secs => :ttl)
FROM unnest(:keys::text[], :slots::int[], :limits::int[]) AS u(key, slot, lim)
WHERE l.key = u.key AND l.slot = u.slot AND l.owner = :owner AND u.slot < u.lim
  AND l.expires_at > clock_timestamp()
RETURNING l.key, l.slot;

-- name: connection_lease_release
DELETE FROM connection_leases l
USING unnest(:keys::text[], :slots::int[]) AS u(key, slot)
WHERE l.key = u.key AND l.slot = u.slot AND l.owner = :owner;

-- name: connection_lease_release_owner
DELETE FROM connection_leases WHERE owner = :owner;

-- name: connection_wait
-- This worker wants a slot of :key and has none: holders will shrink to a fair share.
INSERT INTO connection_waiters (key, owner, until)
VALUES (:key, :owner, clock_timestamp() + make_interval(secs => :seconds))
ON CONFLICT (key, owner) DO UPDATE SET until = excluded.until;

-- name: connection_sharers
-- How many workers hold or want each key right now (fair share = ceil(limit / sharers)).
SELECT u.key, count(DISTINCT o.owner)::int AS sharers
FROM unnest(:keys::text[]) AS u(key)
JOIN (SELECT key, owner FROM connection_leases WHERE expires_at > clock_timestamp()
      UNION SELECT key, owner FROM connection_waiters WHERE until > clock_timestamp()) o ON o.key = u.key
GROUP BY u.key;

-- name: connection_lease_counts
SELECT key, count(*)::int AS open, array_agg(DISTINCT owner) AS owners
FROM connection_leases
WHERE expires_at > clock_timestamp() AND (key = ANY(:keys::text[]) OR :all::boolean)
GROUP BY key ORDER BY key;

-- name: warmup_take
-- Reserve up to :want units of today's cap (schedule[step + 1]) for a ramp. No row comes back when
-- the stored day is not :today: the caller rolls the day (warmup_roll) and asks again.
INSERT INTO warmup_state AS w (key, step, day, sent, granted)
VALUES (:key, 0, :today::date, least(:want::int, (:schedule::int[])[1]), least(:want::int, (:schedule::int[])[1]))
ON CONFLICT (key) DO UPDATE SET
    granted = least(:want::int, greatest(0, (:schedule::int[])[least(w.step + 1, cardinality(:schedule::int[]))] - w.sent)),
    sent = w.sent + least(:want::int, greatest(0, (:schedule::int[])[least(w.step + 1, cardinality(:schedule::int[]))] - w.sent)),
    updated_at = now()
    WHERE w.day = :today::date
RETURNING granted, step, sent, (:schedule::int[])[least(step + 1, cardinality(:schedule::int[]))] AS cap;

-- name: warmup_roll
-- A new day: advance one step when the stored day was healthy (enough volume, delivered ratio and
-- complaint rate within bounds; complaints are 'complained' events naming the ramp's subject), else
-- hold the step (complaint events carry data.source = egress source name or data.sending_domain).
-- Then start the new day's counters. Only one worker's roll wins (day < :today).
UPDATE warmup_state w SET
    step = CASE WHEN h.healthy THEN least(w.step + 1, cardinality(:schedule::int[]) - 1) ELSE w.step END,
    last_health = CASE WHEN h.healthy THEN 'advanced after ' ELSE 'held after ' END
                  || w.day::text || ': delivered ' || w.delivered || '/' || (w.delivered + w.failed)
                  || ', complaints ' || h.complaints,
    day = :today::date, sent = 0, delivered = 0, failed = 0, granted = 0, updated_at = now()
FROM (
    SELECT w2.key,
           (w2.delivered + w2.failed) >= greatest(1, :min_volume::int)
           AND w2.delivered::float8 / greatest(1, w2.delivered + w2.failed) >= :min_delivered_ratio::float8
           AND c.n::float8 / greatest(1, w2.delivered) <= :max_complaint_rate::float8 AS healthy,
           c.n AS complaints
    FROM warmup_state w2,
         LATERAL (SELECT count(*)::int AS n FROM events e
                  WHERE e.type = 'complained'
                    AND (e.data->>'source' = :subject::text OR e.data->>'sending_domain' = :subject::text)
                    AND e.created_at >= w2.day::timestamptz AND e.created_at < (w2.day + 1)::timestamptz) c
    WHERE w2.key = :key
) h
WHERE w.key = h.key AND w.day < :today::date
RETURNING w.step, w.last_health;

-- name: warmup_record
-- Outcomes of today's sends, added in batches by each worker.
UPDATE warmup_state w SET delivered = w.delivered + u.delivered, failed = w.failed + u.failed, updated_at = now()
FROM unnest(:keys::text[], :delivered::int[], :failed::int[]) AS u(key, delivered, failed)
WHERE w.key = u.key AND w.day = :today::date;

-- name: warmup_state
SELECT key, step, day, sent, delivered, failed, last_health, updated_at FROM warmup_state
WHERE key = ANY(:keys::text[]) OR :all::boolean ORDER BY key;

-- name: suspension_record
INSERT INTO suspensions (domain, until, reason, owner)
VALUES (:domain, clock_timestamp() + make_interval(secs => :seconds), :reason, :owner)
ON CONFLICT (domain) DO UPDATE SET until = excluded.until, reason = excluded.reason, owner = excluded.owner;

-- name: suspension_list
SELECT domain, until, reason, owner FROM suspensions
WHERE until > clock_timestamp() AND (domain = ANY(:domains::text[]) OR :all::boolean) ORDER BY domain;

-- name: postpone
-- Hand throttled rows back without counting an attempt, ready again at :next_attempt_at
-- (a warm-up cap reached for today, or a token wait longer than [shaping] max_hold).
UPDATE recipients
SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END, next_attempt_at = :next_attempt_at,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
WHERE id = ANY(:ids::bigint[]) AND state = 'leased' AND lease_owner = :owner
RETURNING id;

-- name: shaping_reload_notify
-- Every worker LISTENs on engine_reload and re-reads its shaping file.
SELECT pg_notify('engine_reload', :payload::text);

-- ==== feedback ====

-- name: feedback_recipient
-- The recipient row a VERP token or a Message-ID names, with what the feedback loop needs to know.
SELECT r.id, r.message_id, r.address, r.domain, r.stream, r.state, m.mail_from
FROM recipients r JOIN messages m ON m.id = r.message_id
WHERE r.id = :recipient_id;

-- name: feedback_recipient_in_message
-- A sibling row of the same message, by address (one SMTP transaction served several recipients).
SELECT r.id, r.message_id, r.address, r.domain, r.stream, r.state, m.mail_from
FROM recipients r JOIN messages m ON m.id = r.message_id
WHERE r.message_id = :message_id AND lower(r.address) = :address;

-- name: mark_bounced
-- An asynchronous permanent failure after acceptance (or for a row still waiting): final 'bounced'.
-- Leased rows are left to their worker, whose ack must still find them leased.
UPDATE recipients r
SET state = 'bounced', last_status = u.status, last_reply = u.reply, updated_at = now()
FROM unnest(:ids::bigint[], :statuses::text[], :replies::text[]) AS u(id, status, reply)
WHERE r.id = u.id AND r.state IN ('delivered', 'queued', 'deferred', 'held')
RETURNING r.id, r.message_id;

-- name: suppressions_add_many
-- Batched suppression inserts; the first reason recorded for (address, scope) stays.
INSERT INTO suppressions (address, scope, reason, source)
SELECT DISTINCT ON (u.address, u.scope) u.address, u.scope, u.reason, u.source
FROM unnest(:addresses::text[], :scopes::text[], :reasons::text[], :sources::text[]) AS u(address, scope, reason, source)
ORDER BY u.address, u.scope
ON CONFLICT (address, scope) DO NOTHING
RETURNING address, scope;

-- name: suppress_pending
-- Mail waiting for newly suppressed addresses (scope '*' = every stream) is never sent: its rows
-- become 'suppressed' in the caller's transaction (which records a 'suppressed' event for each row
-- returned). Leased rows are in a worker's hands and finish their attempt.
UPDATE recipients r
SET state = 'suppressed', reason = u.reason, last_reply = 'suppressed: ' || u.reason, updated_at = now()
FROM unnest(:addresses::text[], :scopes::text[], :reasons::text[]) AS u(address, scope, reason)
WHERE lower(r.address) = u.address AND r.state IN ('queued', 'deferred', 'held')
  AND (u.scope = '*' OR r.stream = u.scope)
RETURNING r.id, r.message_id, r.stream, u.reason, u.scope;

-- name: reputation_add
-- Per-minute counters, added in one statement per batch (rows pre-summed and sorted by the caller,
-- so concurrent writers lock keys in the same order).
INSERT INTO reputation_counters AS c (bucket, provider, source, sending_domain, outcome, category, n)
SELECT date_trunc('minute', coalesce(u.at, now())), u.provider, u.source, u.sending_domain, u.outcome,
       u.category, u.n
FROM unnest(:ats::timestamptz[], :providers::text[], :sources::text[], :sending_domains::text[],
            :outcomes::text[], :categories::text[], :ns::bigint[])
     AS u(at, provider, source, sending_domain, outcome, category, n)
ON CONFLICT (provider, bucket, source, sending_domain, outcome, category) DO UPDATE SET n = c.n + excluded.n;

-- name: reputation_window
-- Sums over the last :seconds for one provider (source / sending domain optional), by outcome and category.
SELECT outcome, category, sum(n)::bigint AS n
FROM reputation_counters
WHERE provider = :provider AND bucket >= date_trunc('minute', now() - make_interval(secs => :seconds))
  AND (:source::text IS NULL OR source = :source) AND (:sending_domain::text IS NULL OR sending_domain = :sending_domain)
GROUP BY outcome, category;

-- name: reputation_summary
-- Every (provider, source, sending domain) seen in the last :seconds, for `engine reputation show`.
SELECT provider, source, sending_domain, outcome, category, sum(n)::bigint AS n
FROM reputation_counters
WHERE bucket >= date_trunc('minute', now() - make_interval(secs => :seconds))
  AND (:provider::text IS NULL OR provider = :provider)
GROUP BY provider, source, sending_domain, outcome, category
ORDER BY provider, source, sending_domain, outcome, category;

-- name: reputation_prune
DELETE FROM reputation_counters WHERE bucket < now() - make_interval(secs => :keep_seconds);

-- ==== automation ====

-- name: automation_hit
-- Count :n matches of a rule in its current fixed window (a new window when the old one ended); returns the count.
INSERT INTO shaping_rule_hits AS h (rule, provider, source, window_start, n)
VALUES (:rule, :provider, :source, now(), :n)
ON CONFLICT (rule, provider, source) DO UPDATE SET
    window_start = CASE WHEN h.window_start + make_interval(secs => :period) <= now() THEN now() ELSE h.window_start END,
    n = CASE WHEN h.window_start + make_interval(secs => :period) <= now() THEN excluded.n ELSE h.n + excluded.n END
RETURNING n;

-- name: automation_hit_reset
DELETE FROM shaping_rule_hits WHERE rule = :rule AND provider = :provider AND source = :source;

-- name: automation_decide
-- Start or extend a decision. fresh: a new episode (none was in force), so the caller records an event.
-- :extend false: a decision still in force is left alone (health pauses are re-checked, not extended).
INSERT INTO shaping_decisions AS d (rule, provider, source, campaign, action, params, reason, started_at, expires_at, ramp_until)
VALUES (:rule, :provider, :source, :campaign, :action, :params::jsonb, :reason, now(),
        now() + make_interval(secs => :duration), now() + make_interval(secs => :duration + :ramp))
ON CONFLICT (rule, provider, source, campaign) DO UPDATE SET
    action = excluded.action, params = excluded.params,
    reason = CASE WHEN d.expires_at <= now() THEN excluded.reason ELSE d.reason END,
    started_at = CASE WHEN d.expires_at <= now() THEN now() ELSE d.started_at END,
    expires_at = excluded.expires_at, ramp_until = excluded.ramp_until
WHERE :extend::boolean OR d.expires_at <= now()
RETURNING started_at = now() AS fresh, started_at, expires_at, ramp_until;

-- name: automation_active
-- Decisions in force or still ramping back, with the database's clock for the caller's arithmetic.
SELECT rule, provider, source, campaign, action, params, reason, started_at, expires_at, ramp_until,
       clock_timestamp() AS now
FROM shaping_decisions WHERE ramp_until > clock_timestamp() ORDER BY provider, rule;

-- name: automation_campaign_add
INSERT INTO campaign_counters AS c (campaign, bucket, final, hard)
SELECT u.campaign, date_trunc('minute', now()), u.final, u.hard
FROM unnest(:campaigns::text[], :finals::bigint[], :hards::bigint[]) AS u(campaign, final, hard)
ORDER BY u.campaign
ON CONFLICT (campaign, bucket) DO UPDATE SET final = c.final + excluded.final, hard = c.hard + excluded.hard;

-- name: automation_campaign_breaches
-- Campaigns whose hard bounce rate over the window is above :rate with at least :min_volume final outcomes.
SELECT campaign, sum(final)::bigint AS final, sum(hard)::bigint AS hard
FROM campaign_counters WHERE bucket > now() - make_interval(secs => :seconds)
GROUP BY campaign
HAVING sum(final) >= :min_volume AND sum(hard)::float8 / sum(final) > :rate;

-- name: automation_complaint_breaches
-- Providers whose complaint rate (complaints / delivered) over the window is above :rate.
SELECT provider, sum(n) FILTER (WHERE outcome = 'delivered')::bigint AS delivered,
       sum(n) FILTER (WHERE outcome = 'complained')::bigint AS complaints
FROM reputation_counters WHERE bucket > now() - make_interval(secs => :seconds)
GROUP BY provider
HAVING sum(n) FILTER (WHERE outcome = 'delivered') >= :min_delivered
   AND sum(n) FILTER (WHERE outcome = 'complained')::float8
       / sum(n) FILTER (WHERE outcome = 'delivered') > :rate;

-- ==== retention ====

-- name: prune_campaign_counters
DELETE FROM campaign_counters WHERE bucket < now() - make_interval(secs => :keep_seconds);

-- name: prune_decisions
-- Decisions whose ramp ended long ago: kept a while for `engine shaping show` and audits, then dropped.
DELETE FROM shaping_decisions WHERE ramp_until < now() - make_interval(secs => :keep_seconds);

-- ==== workers ====

-- name: worker_upsert
-- A worker's heartbeat row: who it is, when it was last alive, which shaping file it applied.
INSERT INTO workers (owner, host, pid, started_at, last_seen, heartbeat_seconds, shaping_source, shaping_digest,
                     shaping_applied_at, reload_id, reload_error, delivered)
VALUES (:owner, :host, :pid, :started_at, now(), :heartbeat_seconds, :shaping_source, :shaping_digest,
        :shaping_applied_at, :reload_id, :reload_error, :delivered)
ON CONFLICT (owner) DO UPDATE SET
    host = EXCLUDED.host, pid = EXCLUDED.pid, started_at = EXCLUDED.started_at, last_seen = now(),
    heartbeat_seconds = EXCLUDED.heartbeat_seconds, shaping_source = EXCLUDED.shaping_source,
    shaping_digest = EXCLUDED.shaping_digest, shaping_applied_at = EXCLUDED.shaping_applied_at,
    reload_id = EXCLUDED.reload_id, reload_error = EXCLUDED.reload_error, delivered = EXCLUDED.delivered;

-- name: worker_delete
-- Clean shutdown: the worker is gone, not stale.
DELETE FROM workers WHERE owner = :owner;

-- name: workers_prune
-- Rows of workers that died long ago (never shut down cleanly).
DELETE FROM workers WHERE last_seen < now() - make_interval(secs => :keep_seconds);

-- name: workers_list
-- Every known worker; stale = not seen for :beats heartbeats (its own period) plus :grace seconds.
SELECT owner, host, pid, started_at, last_seen, heartbeat_seconds, shaping_source, shaping_digest,
       shaping_applied_at, reload_id, reload_error, delivered,
       extract(epoch FROM now() - last_seen)::float8 AS age_seconds,
       last_seen < now() - make_interval(secs => heartbeat_seconds::float8 * :beats + :grace) AS stale
FROM workers ORDER BY host, pid;

-- ==== webhooks (engine.webhooks.endpoints owns webhook_endpoints; engine.webhooks.deliveries the rest) ====

-- name: webhook_endpoint_insert
INSERT INTO webhook_endpoints (id, url, description, event_types, streams, enabled, batch_max, batch_wait_ms, secret_enc)
VALUES (:id, :url, :description, :event_types::text[], :streams::text[], :enabled, :batch_max, :batch_wait_ms, :secret_enc)
RETURNING *;

-- name: webhook_endpoint_list
SELECT * FROM webhook_endpoints ORDER BY created_at, id;

-- name: webhook_endpoint_get
SELECT * FROM webhook_endpoints WHERE id = :id;

-- name: webhook_endpoint_update
-- Each field is changed only when its flag says so (NULL can be a value: "all types").
UPDATE webhook_endpoints SET
    url = CASE WHEN :set_url THEN :url ELSE url END,
    description = CASE WHEN :set_description THEN :description ELSE description END,
    event_types = CASE WHEN :set_event_types THEN :event_types::text[] ELSE event_types END,
    streams = CASE WHEN :set_streams THEN :streams::text[] ELSE streams END,
    enabled = CASE WHEN :set_enabled THEN :enabled ELSE enabled END,
    disabled_reason = CASE WHEN :set_enabled THEN NULL ELSE disabled_reason END,
    batch_max = CASE WHEN :set_batch_max THEN :batch_max ELSE batch_max END,
    batch_wait_ms = CASE WHEN :set_batch_wait_ms THEN :batch_wait_ms ELSE batch_wait_ms END,
    updated_at = now()
WHERE id = :id
RETURNING *;

-- name: webhook_endpoint_disable
-- The receiver answered 410 Gone: stop sending, say why; pending deliveries wait for a re-enable.
UPDATE webhook_endpoints SET enabled = false, disabled_reason = :reason, updated_at = now()
WHERE id = :id AND enabled
RETURNING id;

-- name: webhook_endpoint_rotate
-- A new secret; the old one keeps signing (a second signature) until :overlap_until.
UPDATE webhook_endpoints SET prev_secret_enc = secret_enc, prev_secret_until = :overlap_until,
    secret_enc = :secret_enc, updated_at = now()
WHERE id = :id
RETURNING *;

-- name: webhook_endpoint_delete
DELETE FROM webhook_endpoints WHERE id = :id RETURNING id;

-- name: webhook_fanout
-- One pass of the fan-out: the next events of the commit-ordered stream (see events_page) become
-- one delivery per matching enabled endpoint, and the cursor moves past them, in one statement.
-- The cursor row is taken FOR UPDATE SKIP LOCKED: one dispatcher fans out at a time and the
-- others skip (they get zero rows). An endpoint receives the events written after it was created.
-- The cursor position is compared through scalar subqueries so that it is an index condition on
-- events_cursor_idx: a join filter against the CTE scanned every event before the cursor on
-- each pass (cost growing with the table: ~100 us of Postgres CPU per event at a million).
WITH cur AS (
    SELECT tx, event_id FROM webhook_cursor WHERE id = 1 FOR UPDATE SKIP LOCKED
), ev AS (
    SELECT e.id, e.tx, e.type, e.recipient_id, e.created_at,
           coalesce(e.data->>'stream', r.stream, m.stream) AS stream
    FROM cur
    JOIN events e ON (e.tx, e.id) > ((SELECT tx FROM cur), (SELECT event_id FROM cur))
    LEFT JOIN recipients r ON r.id = e.recipient_id
    LEFT JOIN messages m ON m.id = e.message_id
    WHERE e.tx < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY e.tx, e.id
    LIMIT :limit
), ins AS (
    INSERT INTO webhook_deliveries (endpoint_id, event_id, recipient_id, lane, event_at, next_attempt_at)
    SELECT w.id, ev.id, ev.recipient_id,
           CASE WHEN ev.stream = ANY(:transactional::text[]) THEN 'transactional' ELSE 'default' END,
           ev.created_at, :now::timestamptz
    FROM ev JOIN webhook_endpoints w
      ON w.enabled AND w.created_at <= ev.created_at
     AND ev.type = ANY(coalesce(w.event_types, :types::text[])) AND ev.type = ANY(:types::text[])
     AND (w.streams IS NULL OR ev.stream = ANY(w.streams))
    ORDER BY ev.tx, ev.id, w.id
    RETURNING endpoint_id, lane
), last AS (
    SELECT tx, id FROM ev ORDER BY tx DESC, id DESC LIMIT 1
), moved AS (
    UPDATE webhook_cursor c SET tx = last.tx, event_id = last.id, updated_at = now()
    FROM last WHERE c.id = 1
    RETURNING c.id
)
SELECT (SELECT count(*) FROM ev)::int AS events, (SELECT count(*) FROM moved)::int AS moved,
       i.endpoint_id, i.lane, count(*)::int AS deliveries
FROM (SELECT endpoint_id, lane FROM ins UNION ALL SELECT NULL, NULL) i
GROUP BY i.endpoint_id, i.lane;

-- name: webhook_cursor_get
SELECT tx::text::bigint AS tx, event_id, updated_at FROM webhook_cursor WHERE id = 1;

-- name: webhook_claim
-- Lease the due deliveries of one endpoint lane. Per recipient only the oldest unfinished delivery
-- is claimable: a recipient whose event is retrying holds back only its own later events, and one
-- recipient's events reach the endpoint in stream order.
WITH pick AS (
    SELECT c.id FROM webhook_deliveries c
    WHERE c.endpoint_id = :endpoint_id AND c.lane = :lane AND c.state = 'pending'
      AND c.next_attempt_at <= :now::timestamptz
      AND (c.recipient_id IS NULL OR NOT EXISTS (
            SELECT 1 FROM webhook_deliveries p
            WHERE p.endpoint_id = c.endpoint_id AND p.recipient_id = c.recipient_id AND p.id < c.id
              AND p.state IN ('pending', 'sending')))
    ORDER BY c.next_attempt_at, c.id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries d SET state = 'sending', lease_owner = :owner,
    lease_until = :now::timestamptz + make_interval(secs => :lease_seconds)
FROM pick WHERE d.id = pick.id
RETURNING d.id, d.event_id, d.recipient_id, d.attempts, d.event_at;

-- name: webhook_complete
-- Results of one round of sends. delivered: done; pending: tried and due again at next_attempt_at
-- (the later deliveries of the same recipient wait at least as long, so claims do not rescan
-- them); failed: the dead letter. Only rows this owner still leases are changed.
WITH r AS (
    SELECT * FROM unnest(:ids::bigint[], :states::text[], :next_attempt_ats::timestamptz[],
                         :statuses::int[], :errors::text[], :counted::bool[])
           AS u(id, state, next_attempt_at, status, error, counted)
), done AS (
    UPDATE webhook_deliveries d SET
        state = r.state,
        attempts = d.attempts + CASE WHEN r.counted THEN 1 ELSE 0 END,
        next_attempt_at = coalesce(r.next_attempt_at, d.next_attempt_at),
        last_status = r.status, last_error = r.error, last_attempt_at = :now::timestamptz,
        delivered_at = CASE WHEN r.state = 'delivered' THEN :now::timestamptz END,
        lease_owner = NULL, lease_until = NULL
    FROM r WHERE d.id = r.id AND d.state = 'sending' AND d.lease_owner = :owner
    RETURNING d.id, d.endpoint_id, d.recipient_id, d.state, d.next_attempt_at
), held AS (
    UPDATE webhook_deliveries l SET next_attempt_at = done.next_attempt_at
    FROM done
    WHERE done.state = 'pending' AND done.recipient_id IS NOT NULL
      AND l.endpoint_id = done.endpoint_id AND l.recipient_id = done.recipient_id AND l.id > done.id
      AND l.state = 'pending' AND l.next_attempt_at < done.next_attempt_at
    RETURNING l.id
)
SELECT (SELECT count(*) FROM done)::int AS done, (SELECT count(*) FROM held)::int AS held;

-- name: webhook_release
-- Hand leased deliveries back untried (shutdown, or the endpoint was disabled meanwhile).
UPDATE webhook_deliveries SET state = 'pending', lease_owner = NULL, lease_until = NULL
WHERE id = ANY(:ids::bigint[]) AND state = 'sending' AND lease_owner = :owner
RETURNING id;

-- name: webhook_reclaim
-- Leases of dispatchers that died (kill -9): their deliveries are due again (at-least-once).
UPDATE webhook_deliveries SET state = 'pending', lease_owner = NULL, lease_until = NULL
WHERE id IN (SELECT id FROM webhook_deliveries WHERE state = 'sending' AND lease_until < :now::timestamptz
             ORDER BY lease_until LIMIT 1000 FOR UPDATE SKIP LOCKED)
RETURNING id;

-- name: webhook_recovered
-- The endpoint answered again after failures: its retrying deliveries need not wait out their backoff.
UPDATE webhook_deliveries SET next_attempt_at = :now::timestamptz
WHERE endpoint_id = :endpoint_id AND state = 'pending' AND next_attempt_at > :now::timestamptz
RETURNING id;

-- name: webhook_replay_dead
-- Dead letters back to pending under the same event id (so the same webhook-id), attempts reset.
UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = :now::timestamptz, replay = true,
    last_error = NULL
WHERE endpoint_id = :endpoint_id AND state = 'failed'
  AND (:event_ids::bigint[] IS NULL OR event_id = ANY(:event_ids::bigint[]))
RETURNING id;

-- name: webhook_replay_events
-- Events sent again as new deliveries (by id or by time range), the endpoint's filters applied.
INSERT INTO webhook_deliveries (endpoint_id, event_id, recipient_id, lane, event_at, next_attempt_at, replay)
SELECT w.id, e.id, e.recipient_id,
       CASE WHEN coalesce(e.data->>'stream', r.stream, m.stream) = ANY(:transactional::text[])
            THEN 'transactional' ELSE 'default' END,
       e.created_at, :now::timestamptz, true
FROM webhook_endpoints w
JOIN events e ON (:event_ids::bigint[] IS NULL OR e.id = ANY(:event_ids::bigint[]))
             AND (:since::timestamptz IS NULL OR e.created_at >= :since)
             AND (:until::timestamptz IS NULL OR e.created_at < :until)
LEFT JOIN recipients r ON r.id = e.recipient_id
LEFT JOIN messages m ON m.id = e.message_id
WHERE w.id = :endpoint_id
  AND e.type = ANY(coalesce(w.event_types, :types::text[])) AND e.type = ANY(:types::text[])
  AND (w.streams IS NULL OR coalesce(e.data->>'stream', r.stream, m.stream) = ANY(w.streams))
ORDER BY e.tx, e.id
LIMIT :limit
RETURNING id;

-- name: webhook_deliveries_list
SELECT d.id, d.event_id, d.recipient_id, d.lane, d.state, d.attempts, d.event_at, d.next_attempt_at,
       d.last_status, d.last_error, d.last_attempt_at, d.delivered_at, d.replay
FROM webhook_deliveries d
WHERE d.endpoint_id = :endpoint_id AND (:state::text IS NULL OR d.state = :state)
  AND (:before::bigint IS NULL OR d.id < :before)
ORDER BY d.id DESC
LIMIT :limit;

-- name: webhook_status
-- Per endpoint: backlog, dead letters, age of the oldest undelivered event, and event-to-2xx lag
-- percentiles over the deliveries of the last :window_seconds (each part reads only its own state).
SELECT w.id, p.pending, p.retrying, p.oldest_pending_seconds, f.failed,
       l.delivered_recent, l.lag_p50_seconds, l.lag_p95_seconds, l.last_delivered_at
FROM webhook_endpoints w
CROSS JOIN LATERAL (
    SELECT count(*)::int AS pending, count(*) FILTER (WHERE d.attempts > 0)::int AS retrying,
           extract(epoch FROM :now::timestamptz - min(d.event_at))::float8 AS oldest_pending_seconds
    FROM webhook_deliveries d WHERE d.endpoint_id = w.id AND d.state IN ('pending', 'sending')) p
CROSS JOIN LATERAL (
    SELECT count(*)::int AS failed FROM webhook_deliveries d WHERE d.endpoint_id = w.id AND d.state = 'failed') f
CROSS JOIN LATERAL (
    SELECT count(*)::int AS delivered_recent,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM d.delivered_at - d.event_at))::float8
               AS lag_p50_seconds,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM d.delivered_at - d.event_at))::float8
               AS lag_p95_seconds,
           max(d.delivered_at) AS last_delivered_at
    FROM webhook_deliveries d
    WHERE d.endpoint_id = w.id AND d.state = 'delivered'
      AND d.delivered_at >= :now::timestamptz - make_interval(secs => :window_seconds)) l
WHERE :endpoint_id::uuid IS NULL OR w.id = :endpoint_id
ORDER BY w.created_at, w.id;

-- name: webhook_wake
-- Dispatchers LISTEN on engine_webhooks (engine.webhooks.deliveries.WAKE_CHANNEL).
SELECT pg_notify('engine_webhooks', '');

-- name: webhook_prune
-- Delivered rows are history after :keep_seconds (dead letters stay until replayed).
DELETE FROM webhook_deliveries
WHERE id IN (SELECT id FROM webhook_deliveries WHERE state = 'delivered'
             AND delivered_at < :now::timestamptz - make_interval(secs => :keep_seconds) LIMIT 10000)
RETURNING id;

-- ==== consent (engine.consent.store owns consent and consent_history) ====

-- name: consent_for_address
SELECT address, purpose, status, legal_basis, source, captured_at, policy_version, double_opt_in_at, evidence,
       effective_from, effective_until, contact_id, legacy, updated_at
FROM consent WHERE address = :address ORDER BY purpose;

-- name: consent_history_for_address
SELECT id, purpose, old_status, status, legal_basis, source, captured_at, policy_version, double_opt_in_at,
       evidence, effective_from, effective_until, contact_id, legacy, actor, recorded_at
FROM consent_history WHERE address = :address ORDER BY id DESC LIMIT :limit;

-- name: consent_page
-- Keyset pages over the current records for the export (no OFFSET: cost follows the page).
SELECT address, purpose, status, legal_basis, source, captured_at, policy_version, double_opt_in_at, evidence,
       effective_from, effective_until, contact_id, legacy, updated_at
FROM consent
WHERE (address, purpose) > (:after_address::text, :after_purpose::text)
  AND (:purpose::text IS NULL OR purpose = :purpose)
ORDER BY address, purpose
LIMIT :limit;

-- name: consent_erase
WITH a AS (DELETE FROM consent WHERE address = :address RETURNING 1),
     h AS (DELETE FROM consent_history WHERE address = :address RETURNING 1)
SELECT (SELECT count(*) FROM a) + (SELECT count(*) FROM h) AS n;

-- ==== erasure: each owner's part (engine.consent.erasure runs them in one transaction) ====

-- name: outbox_erase_address
-- The address's recipient rows go (their attempts with them). Each message they were on loses its
-- body, sender and metadata too unless another recipient still waits for it (a body is kept only
-- while someone still needs it); the message row stays so other recipients' history stays.
WITH r AS (
    SELECT id, message_id FROM recipients WHERE lower(address) = :address
), done AS (
    SELECT DISTINCT r.message_id FROM r
    WHERE NOT EXISTS (SELECT 1 FROM recipients o
                      WHERE o.message_id = r.message_id AND lower(o.address) <> :address
                        AND o.state IN ('queued', 'leased', 'deferred', 'held'))
), blank AS (
    UPDATE messages m SET raw = NULL, content = '{"erased": true}'::jsonb,
        mail_from = CASE WHEN lower(m.mail_from) = :address THEN '' ELSE m.mail_from END,
        metadata = CASE WHEN position(:address IN lower(m.metadata::text)) > 0 THEN '{}'::jsonb ELSE m.metadata END
    FROM done WHERE m.id = done.message_id
    RETURNING m.id
), gone AS (
    DELETE FROM recipients x USING r WHERE x.id = r.id RETURNING x.id, x.message_id
)
SELECT (SELECT array_agg(id) FROM gone) AS recipient_ids,
       (SELECT array_agg(DISTINCT message_id) FROM gone) AS message_ids,
       (SELECT count(*) FROM blank)::int AS blanked;

-- name: outbox_kept_messages
-- The erased address's messages that were kept (another recipient still needs them): their stored
-- form may still name it (a to/cc list, the body, metadata, raw headers); the caller rewrites them.
SELECT id, mail_from, raw, content, metadata FROM messages
WHERE id = ANY(:ids::uuid[]) AND content IS DISTINCT FROM '{"erased": true}'::jsonb;

-- name: outbox_scrub_message
UPDATE messages SET mail_from = :mail_from, raw = :raw, content = :content, metadata = :metadata
WHERE id = :id;

-- name: events_erase
-- Events about the address: its recipients' events, events about the address itself (consent),
-- observations tied to no recipient that name it (an unverified report's reported_recipient),
-- and other events of its messages whose payload names it (a bounce reply quoting it).
DELETE FROM events e
WHERE e.recipient_id = ANY(:recipient_ids::bigint[])
   OR (e.recipient_id IS NULL AND e.data->>'address' = :address)
   OR (e.recipient_id IS NULL AND position(:address IN lower(e.data::text)) > 0)
   OR (e.message_id = ANY(:message_ids::uuid[]) AND position(:address IN lower(e.data::text)) > 0)
RETURNING e.id;

-- name: webhook_deliveries_erase
DELETE FROM webhook_deliveries WHERE event_id = ANY(:event_ids::bigint[]) RETURNING id;

-- name: suppression_erase
DELETE FROM suppressions WHERE address = :address RETURNING address;

-- name: idempotency_erase
-- Stored answers list recipient addresses; the answer of a request that named the address goes.
DELETE FROM idempotency_keys WHERE position(:address IN lower(response::text)) > 0 RETURNING key;

-- name: do_not_mail_add
INSERT INTO do_not_mail (hash)
SELECT sha256(salt || convert_to(:address::text, 'UTF8')) FROM do_not_mail_salt WHERE id = 1
ON CONFLICT (hash) DO NOTHING
RETURNING encode(hash, 'hex') AS hash;

-- name: do_not_mail_hash
SELECT encode(sha256(salt || convert_to(:address::text, 'UTF8')), 'hex') AS hash,
       EXISTS (SELECT 1 FROM do_not_mail d WHERE d.hash = sha256(salt || convert_to(:address::text, 'UTF8'))) AS listed
FROM do_not_mail_salt WHERE id = 1;

-- ==== metrics (read at scrape time; engine.api.metrics) ====

-- name: metrics_queue
-- Waiting recipients by stream and state; 'ready' = due now. Only non-final rows are counted.
SELECT stream, state, count(*)::bigint AS n,
       count(*) FILTER (WHERE state IN ('queued', 'deferred') AND next_attempt_at <= now())::bigint AS ready,
       extract(epoch FROM now() - min(created_at))::float8 AS oldest_seconds
FROM recipients
WHERE state IN ('queued', 'deferred', 'leased', 'held')
GROUP BY stream, state;

-- name: metrics_warmup
SELECT key, step, sent, delivered, failed, day FROM warmup_state;

-- name: metrics_decisions
SELECT action, provider, count(*)::int AS n FROM shaping_decisions WHERE ramp_until > now() GROUP BY action, provider;

-- name: metrics_reputation
-- Outcomes per provider over the last :seconds (complaint and bounce rates are derived from them).
SELECT provider, outcome, sum(n)::bigint AS n FROM reputation_counters
WHERE bucket >= now() - make_interval(secs => :seconds)
GROUP BY provider, outcome;

-- name: metrics_unsubscribe_lag
-- How long the oldest unsubscribe or consent change has waited for its webhook (0 when none waits).
SELECT coalesce(extract(epoch FROM now() - min(d.event_at)), 0)::float8 AS seconds
FROM webhook_deliveries d JOIN events e ON e.id = d.event_id
WHERE d.state IN ('pending', 'sending') AND e.type IN ('unsubscribed', 'consent_changed');

-- ==== export (engine.export.exporter owns export_state and export_batches) ====

-- name: export_init
INSERT INTO export_state (destination) VALUES (:destination) ON CONFLICT (destination) DO NOTHING;

-- name: export_lease
-- Take the destination for one batch (several exporters may run: one works at a time). A lease,
-- not a row lock: a lock would hold a transaction id open while files are written, and that
-- would hold back every reader of the event stream (they stop below the oldest running one).
UPDATE export_state SET leased_by = :owner, lease_until = now() + make_interval(secs => :lease_seconds)
WHERE destination = :destination AND (leased_by IS NULL OR lease_until < now() OR leased_by = :owner)
RETURNING tx::text::bigint AS tx, event_id, pending_tx::text::bigint AS pending_tx, pending_event_id;

-- name: export_plan
-- Where the next batch ends: up to :limit events past the cursor, below the snapshot's xmin (so an
-- event that commits late is never passed; see events_page). No row: nothing new.
WITH r AS (
    SELECT e.tx, e.id FROM events e
    WHERE (e.tx, e.id) > (:tx::text::xid8, :id::bigint) AND e.tx < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY e.tx, e.id
    LIMIT :limit
)
SELECT tx::text::bigint AS tx, id FROM r ORDER BY tx DESC, id DESC LIMIT 1;

-- name: export_set_pending
UPDATE export_state SET pending_tx = :tx::text::xid8, pending_event_id = :id, updated_at = now()
WHERE destination = :destination AND leased_by = :owner
RETURNING destination;

-- name: export_commit
-- The batch's files are durable: move the cursor past it, remember the batch, free the lease.
WITH s AS (
    UPDATE export_state SET tx = pending_tx, event_id = pending_event_id, pending_tx = NULL, pending_event_id = NULL,
        exported = exported + :events, last_file = :last_file, last_batch_at = now(), last_error = NULL,
        leased_by = NULL, lease_until = NULL, updated_at = now()
    WHERE destination = :destination AND leased_by = :owner AND pending_tx IS NOT NULL
    RETURNING destination
)
INSERT INTO export_batches (destination, start_tx, start_event_id, end_tx, end_event_id, events, first_at, last_at, manifest)
SELECT :destination, :start_tx::text::xid8, :start_id, :end_tx::text::xid8, :end_id, :events, :first_at, :last_at, :manifest
FROM s
ON CONFLICT (destination, end_tx, end_event_id) DO UPDATE SET written_at = now()
RETURNING destination;

-- name: export_release
-- The destination failed (store down): say why, free the lease, keep the pending batch for the retry.
UPDATE export_state SET leased_by = NULL, lease_until = NULL, last_error = :error, last_error_at = now(), updated_at = now()
WHERE destination = :destination AND leased_by = :owner
RETURNING destination;

-- name: export_status
SELECT s.destination, s.tx::text::bigint AS tx, s.event_id, s.pending_event_id, s.leased_by, s.lease_until, s.exported,
       s.last_file, s.last_batch_at, s.last_error, s.last_error_at,
       (SELECT extract(epoch FROM now() - min(e.created_at))::float8 FROM events e
        WHERE (e.tx, e.id) > (s.tx, s.event_id)) AS lag_seconds,
       (SELECT count(*) FROM events e WHERE (e.tx, e.id) > (s.tx, s.event_id))::bigint AS behind
FROM export_state s ORDER BY s.destination;

-- name: export_batches_since
SELECT start_tx::text::bigint AS start_tx, start_event_id, end_tx::text::bigint AS end_tx, end_event_id, events,
       first_at, last_at, manifest
FROM export_batches WHERE destination = :destination AND last_at >= :since
ORDER BY end_tx, end_event_id;

-- name: export_events
-- One batch of the stream, typed and flattened for Parquet (read with COPY ... CSV, parsed by
-- pyarrow): what each public event says, joined with its recipient and message. The partition
-- date and hour are computed by the exporter from occurred_us (cheaper there than to_char here).
SELECT e.id AS event_id, e.type AS kind,
       (extract(epoch FROM e.created_at) * 1000000)::bigint AS occurred_us,
       e.message_id::text AS message_id, e.recipient_id,
       coalesce(e.data->>'stream', r.stream, m.stream) AS stream,
       r.contact_id, r.external::text AS external,
       m.metadata->>'campaign' AS campaign, m.metadata::text AS metadata,
       nullif(split_part(m.content->>'template', '@', 1), '') AS template_name,
       CASE WHEN split_part(m.content->>'template', '@', 2) ~ '^[0-9]{1,9}$'
            THEN split_part(m.content->>'template', '@', 2)::int END AS template_version,
       e.data->>'sending_domain' AS sending_domain, e.data->>'provider' AS provider,
       CASE WHEN e.type = 'accepted' OR e.data->>'at' = 'submit' THEN NULL ELSE e.data->>'source' END AS egress,
       CASE WHEN e.type = 'accepted' OR e.data->>'at' = 'submit' THEN e.data->>'source' END AS submission_source,
       CASE WHEN jsonb_typeof(e.data->'code') = 'number' THEN (e.data->>'code')::int END AS smtp_code,
       CASE WHEN e.type = 'consent_changed' THEN NULL ELSE e.data->>'status' END AS enhanced_status,
       e.data->>'reply' AS reply, e.data->>'mx' AS mx, e.data->>'category' AS category,
       CASE WHEN jsonb_typeof(e.data->'hard') = 'boolean' THEN (e.data->>'hard')::boolean END AS hard,
       CASE WHEN jsonb_typeof(e.data->'permanent') = 'boolean' THEN (e.data->>'permanent')::boolean END AS permanent,
       coalesce(CASE WHEN jsonb_typeof(e.data->'attempt') = 'number' THEN (e.data->>'attempt')::int END,
                CASE WHEN e.type IN ('delivered', 'bounced', 'expired') THEN r.attempts END) AS attempt,
       e.data->>'next_attempt_at' AS next_attempt_at,
       CASE WHEN jsonb_typeof(e.data->'link_index') = 'number' THEN (e.data->>'link_index')::int END AS link_index,
       e.data->>'url' AS url, e.data->>'method' AS method, e.data->>'feedback_type' AS feedback_type,
       e.data->>'reason' AS reason, e.data->>'origin' AS origin,
       CASE WHEN jsonb_typeof(e.data->'verified') = 'boolean' THEN (e.data->>'verified')::boolean END AS verified,
       e.data->>'purpose' AS purpose,
       CASE WHEN e.type = 'consent_changed' THEN e.data->>'status' END AS consent_status,
       e.data->>'old_status' AS old_status, e.data->>'legal_basis' AS legal_basis,
       e.data->>'policy_version' AS policy_version, e.data->>'address_hash' AS address_hash
FROM events e
LEFT JOIN recipients r ON r.id = e.recipient_id
LEFT JOIN messages m ON m.id = e.message_id
WHERE (e.tx, e.id) > (:start_tx::text::xid8, :start_id::bigint) AND (e.tx, e.id) <= (:end_tx::text::xid8, :end_id::bigint)
  AND e.type = ANY(:types::text[])
ORDER BY e.tx, e.id;

-- name: export_split
-- Where a batch is cut in two, to be read by two backends at once: the bound :half events in
-- (an index-only scan of half the batch). No row: the batch is smaller than that.
SELECT e.tx::text::bigint AS tx, e.id FROM events e
WHERE (e.tx, e.id) > (:start_tx::text::xid8, :start_id::bigint) AND (e.tx, e.id) <= (:end_tx::text::xid8, :end_id::bigint)
ORDER BY e.tx, e.id
OFFSET :half LIMIT 1;

-- name: export_count
SELECT count(*)::int AS n FROM events e
WHERE (e.tx, e.id) > (:start_tx::text::xid8, :start_id::bigint) AND (e.tx, e.id) <= (:end_tx::text::xid8, :end_id::bigint)
  AND e.type = ANY(:types::text[]);

-- name: export_facts
-- Daily facts for one UTC date: counts per (stream, provider, sending domain, campaign).
SELECT coalesce(e.data->>'stream', r.stream, m.stream) AS stream, e.data->>'provider' AS provider,
       e.data->>'sending_domain' AS sending_domain, m.metadata->>'campaign' AS campaign,
       count(*) FILTER (WHERE e.type = 'accepted')::bigint AS sent,
       count(*) FILTER (WHERE e.type = 'delivered')::bigint AS delivered,
       count(*) FILTER (WHERE e.type = 'deferred')::bigint AS deferred,
       count(*) FILTER (WHERE e.type = 'bounced' AND (e.data->>'hard') = 'true')::bigint AS bounced_hard,
       count(*) FILTER (WHERE e.type = 'bounced' AND (e.data->>'hard') IS DISTINCT FROM 'true'
                        AND (e.data->>'permanent') = 'true')::bigint AS bounced_soft,
       count(*) FILTER (WHERE e.type = 'expired')::bigint AS expired,
       count(*) FILTER (WHERE e.type = 'complained')::bigint AS complaints,
       count(*) FILTER (WHERE e.type = 'opened')::bigint AS opens,
       count(*) FILTER (WHERE e.type = 'clicked')::bigint AS clicks,
       count(*) FILTER (WHERE e.type = 'unsubscribed')::bigint AS unsubscribes
FROM events e
LEFT JOIN recipients r ON r.id = e.recipient_id
LEFT JOIN messages m ON m.id = e.message_id
WHERE e.created_at >= (:day::date)::timestamp AT TIME ZONE 'UTC'
  AND e.created_at < (:day::date + 1)::timestamp AT TIME ZONE 'UTC'
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4;

-- name: export_session
-- The batch read's plan, for this transaction only. Index probes per event into recipients and
-- messages (nested loops over the (tx, id) index, already in order: no sort): without this the
-- planner hash-joins a large batch against a sequential scan of both tables, a cost that grows
-- with the tables, not the batch (1.3 s against 0.45 s of backend time per 50,000 events at
-- 300,000 messages, and worse at every later size), in parallel workers that take the core the
-- exporter needs. A sort, if one is ever planned, stays in memory.
SELECT set_config('work_mem', '128MB', true), set_config('enable_hashjoin', 'off', true),
       set_config('enable_mergejoin', 'off', true), set_config('max_parallel_workers_per_gather', '0', true);

-- ==== audit log and API key lifecycle ====

-- name: api_key_current
-- The one current key of a name (neither revoked nor rotated out), locked for a rotation.
SELECT id, scopes, expires_at, allow_cidrs FROM api_keys
WHERE name = :name AND revoked_at IS NULL AND rotated_at IS NULL
FOR UPDATE;

-- name: api_key_rotate_out
-- The key a rotation replaces works until its grace ends (or its own earlier expiry).
UPDATE api_keys SET rotated_at = now(),
       expires_at = least(coalesce(expires_at, 'infinity'::timestamptz), now() + make_interval(secs => :grace))
WHERE id = :id
RETURNING expires_at;

-- name: api_key_set_allow
-- Every key of the name that still works gets the new allowlist (NULL: any address).
UPDATE api_keys SET allow_cidrs = :allow_cidrs
WHERE name = :name AND revoked_at IS NULL AND (rotated_at IS NULL OR expires_at > now())
RETURNING id;

-- name: api_key_allow_of
SELECT id, allow_cidrs::text[] AS allow FROM api_keys
WHERE name = :name AND revoked_at IS NULL AND (rotated_at IS NULL OR expires_at > now())
ORDER BY id;

-- name: audit_insert
-- An action about an email address names it by its erasure hash (see do_not_mail_hash), never in
-- clear: erasing the address leaves the log as it is, and the rows still correlate.
INSERT INTO audit_log (actor, actor_key_id, source_ip, action, target, before, after)
VALUES (:actor, :actor_key_id, :source_ip::inet, :action,
        coalesce(:target::text, (SELECT 'sha256:' || encode(sha256(salt || convert_to(:address::text, 'UTF8')), 'hex')
                                 FROM do_not_mail_salt WHERE id = 1)),
        :before, :after)
RETURNING id, at;

-- name: audit_address_target
-- How the log names an (already normalized) email address: for finding its rows.
SELECT 'sha256:' || encode(sha256(salt || convert_to(:address::text, 'UTF8')), 'hex') FROM do_not_mail_salt WHERE id = 1;

-- name: audit_page
-- Rows after (:tx, :id) in commit order, below the snapshot's xmin (see events_page): a reader
-- paging by cursor never passes a row whose transaction commits late.
SELECT id, tx::text::bigint AS tx, at, actor, actor_key_id, host(source_ip) AS source_ip, action, target, before, after
FROM audit_log
WHERE (tx, id) > (:tx::text::xid8, :id::bigint)
  AND tx < pg_snapshot_xmin(pg_current_snapshot())
  AND (:action::text IS NULL OR action = :action OR (right(:action, 1) = '.' AND left(action, length(:action)) = :action))
  AND (:actor::text IS NULL OR actor = :actor)
  AND (:target::text IS NULL OR target = :target)
  AND (:since::timestamptz IS NULL OR at >= :since)
  AND (:until::timestamptz IS NULL OR at < :until)
ORDER BY tx, id
LIMIT :limit;

-- name: audit_prune_allow
-- Lets this transaction's audit_prune pass the append-only trigger (and only this transaction's).
SELECT set_config('engine.audit_prune', :on, true);

-- name: audit_prune
-- Retention: the oldest rows before :before, a batch at a time (no long lock).
DELETE FROM audit_log WHERE id IN (
    SELECT id FROM audit_log WHERE at < :before ORDER BY at LIMIT :limit
);

-- ==== retention: each owner's purge, run in small batches by engine.retention ====

-- name: outbox_prune_bodies
-- Message bodies (raw, content) are blanked once every recipient of the message has been final
-- since before :before; the message and recipient rows stay (history, events, late bounces).
-- Walks messages_body_idx oldest first: a message created after :before cannot be due, and a
-- blanked one has left the index. The recipients test is a scalar subquery on purpose: it runs
-- as one index probe per candidate, where a NOT EXISTS may be planned as a scan of every
-- waiting recipient per batch.
WITH due AS (
    SELECT m.id FROM messages m
    WHERE (m.raw IS NOT NULL OR m.content NOT IN ('{"erased": true}'::jsonb, '{"purged": true}'::jsonb))
      AND m.created_at < :before
      AND (SELECT bool_and(r.state IN ('delivered', 'bounced', 'expired', 'suppressed') AND r.updated_at < :before)
           FROM recipients r WHERE r.message_id = m.id)
    ORDER BY m.created_at
    LIMIT :limit
    FOR UPDATE OF m SKIP LOCKED
), blank AS (
    UPDATE messages m SET raw = NULL, content = '{"purged": true}'::jsonb
    WHERE m.id = ANY(ARRAY(SELECT id FROM due))
    RETURNING m.id
)
SELECT count(*)::int AS n FROM blank;

-- name: outbox_due_bodies
SELECT count(*)::bigint AS n FROM messages m
WHERE (m.raw IS NOT NULL OR m.content NOT IN ('{"erased": true}'::jsonb, '{"purged": true}'::jsonb))
  AND m.created_at < :before
  AND (SELECT bool_and(r.state IN ('delivered', 'bounced', 'expired', 'suppressed') AND r.updated_at < :before)
       FROM recipients r WHERE r.message_id = m.id);

-- name: outbox_prune_recipients
-- Recipient rows final since before :before go, their attempts with them (ON DELETE CASCADE), and
-- each message none of whose recipients is left. Oldest first through recipients_final_idx. The
-- ids travel as arrays (= ANY) so every step is an index probe per row, never a table scan.
WITH due AS (
    SELECT id, message_id FROM recipients
    WHERE state IN ('delivered', 'bounced', 'expired', 'suppressed') AND updated_at < :before
    ORDER BY updated_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
), ids AS (
    SELECT coalesce(array_agg(id), '{}') AS rids, coalesce(array_agg(DISTINCT message_id), '{}') AS mids FROM due
), gone AS (
    DELETE FROM recipients r WHERE r.id = ANY((SELECT rids FROM ids)::bigint[]) RETURNING r.id
), msgs AS (
    DELETE FROM messages m
    WHERE m.id = ANY((SELECT mids FROM ids)::uuid[])
      AND NOT EXISTS (SELECT 1 FROM recipients o WHERE o.message_id = m.id AND o.id NOT IN (SELECT id FROM due))
    RETURNING m.id
)
SELECT (SELECT count(*) FROM gone)::int AS recipients, (SELECT count(*) FROM msgs)::int AS messages;

-- name: outbox_due_recipients
SELECT count(*)::bigint AS recipients,
       (SELECT count(*) FROM attempts a JOIN recipients r ON r.id = a.recipient_id
        WHERE r.state IN ('delivered', 'bounced', 'expired', 'suppressed') AND r.updated_at < :before)::bigint AS attempts
FROM recipients
WHERE state IN ('delivered', 'bounced', 'expired', 'suppressed') AND updated_at < :before;

-- name: events_prune
-- Events written before :before, except those a webhook still owes someone: an event an enabled
-- endpoint has a pending or sending delivery for, and (while any endpoint is enabled) an event the
-- fan-out has not reached yet, and (export on: :export_destination) an event the exporter has not
-- passed. Dead letters do not hold their event. With a large backlog of
-- pending deliveries the planner probes webhook_deliveries_open_event_idx once per candidate.
WITH cur AS (
    SELECT c.tx, c.event_id FROM webhook_cursor c
    WHERE c.id = 1 AND EXISTS (SELECT 1 FROM webhook_endpoints w WHERE w.enabled)
), exp AS (
    SELECT coalesce(s.tx, '0'::xid8) AS tx, coalesce(s.event_id, 0) AS event_id
    FROM (SELECT 1) AS one LEFT JOIN export_state s ON s.destination = :export_destination::text
    WHERE :export_destination::text IS NOT NULL
), due AS (
    SELECT e.id FROM events e
    WHERE e.created_at < :before
      AND NOT EXISTS (SELECT 1 FROM cur WHERE (e.tx, e.id) > (cur.tx, cur.event_id))
      AND NOT EXISTS (SELECT 1 FROM exp WHERE (e.tx, e.id) > (exp.tx, exp.event_id))
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id
                      WHERE d.event_id = e.id AND d.state IN ('pending', 'sending') AND w.enabled)
    ORDER BY e.created_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
DELETE FROM events e WHERE e.id = ANY(ARRAY(SELECT id FROM due))
RETURNING e.id;

-- name: events_due
WITH cur AS (
    SELECT c.tx, c.event_id FROM webhook_cursor c
    WHERE c.id = 1 AND EXISTS (SELECT 1 FROM webhook_endpoints w WHERE w.enabled)
), exp AS (
    SELECT coalesce(s.tx, '0'::xid8) AS tx, coalesce(s.event_id, 0) AS event_id
    FROM (SELECT 1) AS one LEFT JOIN export_state s ON s.destination = :export_destination::text
    WHERE :export_destination::text IS NOT NULL
)
SELECT count(*)::bigint AS n FROM events e
WHERE e.created_at < :before
  AND NOT EXISTS (SELECT 1 FROM cur WHERE (e.tx, e.id) > (cur.tx, cur.event_id))
  AND NOT EXISTS (SELECT 1 FROM exp WHERE (e.tx, e.id) > (exp.tx, exp.event_id))
  AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id
                  WHERE d.event_id = e.id AND d.state IN ('pending', 'sending') AND w.enabled);

-- name: retention_sizes
-- On-disk size (table, indexes and TOAST) and the planner's row estimate of each table, summed
-- over its partitions when it has some (events, attempts); a table that does not exist (yet) gives NULLs.
SELECT t.name,
       (CASE WHEN c.relkind = 'p'
             THEN (SELECT sum(pg_total_relation_size(pt.relid)) FROM pg_partition_tree(c.oid) pt WHERE pt.isleaf)
             ELSE pg_total_relation_size(c.oid) END)::bigint AS bytes,
       (CASE WHEN c.relkind = 'p'
             THEN (SELECT sum(greatest(l.reltuples, 0)) FROM pg_partition_tree(c.oid) pt
                   JOIN pg_class l ON l.oid = pt.relid WHERE pt.isleaf)
             ELSE greatest(c.reltuples, 0) END)::bigint AS estimated_rows
FROM unnest(:tables::text[]) WITH ORDINALITY AS t(name, i)
LEFT JOIN pg_class c ON c.oid = to_regclass(t.name)
ORDER BY t.i;

-- ==== dashboard (reads only; engine.dashboard.data) ====

-- name: dashboard_event_counts
-- Recipient state changes over the last :seconds, by type: the overview's rates (received = accepted).
SELECT type, count(*)::bigint AS n FROM events
WHERE created_at >= now() - make_interval(secs => :seconds)
  AND type IN ('accepted', 'delivered', 'deferred', 'bounced', 'suppressed', 'complained')
GROUP BY type;

-- name: dashboard_recent_replies
-- The latest delivery outcomes with their replies (newest first), for "last replies" per provider:
-- the shaping provider the writer recorded, else the recipient's domain (as in reputation_counters).
SELECT e.created_at, e.type, coalesce(e.data->>'provider', r.domain, '') AS provider,
       e.data->>'code' AS code, e.data->>'reply' AS reply, e.data->>'mx' AS mx
FROM events e LEFT JOIN recipients r ON r.id = e.recipient_id
WHERE e.created_at >= now() - make_interval(secs => :seconds)
  AND e.type IN ('delivered', 'deferred', 'bounced')
ORDER BY e.created_at DESC, e.id DESC
LIMIT :limit;

-- ==== queue at depth (issue 14) ====

-- name: queue_stats_rows
-- The planner's row count of recipients (kept by autovacuum/ANALYZE; -1 before the first one).
SELECT reltuples::bigint FROM pg_class WHERE oid = 'recipients'::regclass;

-- name: queue_stats_sampled
-- Estimated queue_stats: a SYSTEM sample of :percent % of the table's pages, counts scaled up.
-- Small groups may be missing or off; next_attempt_at is the earliest within the sample.
SELECT state, stream, domain, greatest(1, round(count(*) * 100.0 / :percent::real))::bigint AS n,
       min(next_attempt_at) FILTER (WHERE state IN ('queued', 'deferred')) AS next_attempt_at,
       true AS estimate
FROM recipients TABLESAMPLE SYSTEM (:percent::real)
GROUP BY state, stream, domain ORDER BY state, stream, domain;

-- ==== partitions by day: events and attempts (issue 12, migration 0017) ====

-- name: partition_create
-- The day partition of :parent holding :day (UTC), unless it exists; true when it was new.
-- engine_partition_create (migration 0017) moves the day's rows out of the default partition
-- first, and serialises engines doing this at once. One call per statement (so per transaction):
-- holding one table's locks while waiting for another's would deadlock with the outbox.
SELECT engine_partition_create(:parent, :day::date) AS created;

-- name: partitions_list
-- Every partition of :parents with its day (NULL: the default partition), size and row estimate.
SELECT p.relname::text AS parent, c.relname::text AS name,
       CASE WHEN c.relname ~ '_p[0-9]{8}$' THEN to_date(right(c.relname, 8), 'YYYYMMDD') END AS day,
       pg_total_relation_size(c.oid)::bigint AS bytes, greatest(c.reltuples, 0)::bigint AS estimated_rows
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
WHERE p.oid = ANY(ARRAY(SELECT to_regclass(t)::oid FROM unnest(:parents::text[]) AS t))
ORDER BY 1, 3 NULLS FIRST;

-- name: partition_drop
-- Detach and drop the day partition of :parent holding :day (false: there is none).
SELECT engine_partition_drop(:parent, :day::date) AS dropped;

-- name: events_day_held
-- Whether someone still waits for an event of :day (UTC): the same conditions as events_prune, for
-- a whole day at once. The fan-out has not passed one of them (while any endpoint is enabled), an
-- enabled endpoint has a pending or sending delivery for one (a delivery carries its event's
-- time), or the exporter of :export_destination (NULL: export off) has not passed one.
WITH bounds AS (
    SELECT :day::date::timestamp AT TIME ZONE 'UTC' AS lo, (:day::date + 1)::timestamp AT TIME ZONE 'UTC' AS hi
), cur AS (
    SELECT c.tx, c.event_id FROM webhook_cursor c
    WHERE c.id = 1 AND EXISTS (SELECT 1 FROM webhook_endpoints w WHERE w.enabled)
), exp AS (
    SELECT coalesce(s.tx, '0'::xid8) AS tx, coalesce(s.event_id, 0) AS event_id
    FROM (SELECT 1) AS one LEFT JOIN export_state s ON s.destination = :export_destination::text
    WHERE :export_destination::text IS NOT NULL
)
SELECT EXISTS (SELECT 1 FROM events e
               WHERE e.created_at >= (SELECT lo FROM bounds) AND e.created_at < (SELECT hi FROM bounds)
                 AND (e.tx, e.id) > ((SELECT tx FROM cur), (SELECT event_id FROM cur)))
    OR EXISTS (SELECT 1 FROM events e
               WHERE e.created_at >= (SELECT lo FROM bounds) AND e.created_at < (SELECT hi FROM bounds)
                 AND (e.tx, e.id) > ((SELECT tx FROM exp), (SELECT event_id FROM exp)))
    OR EXISTS (SELECT 1 FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id
               WHERE d.state IN ('pending', 'sending') AND w.enabled
                 AND d.event_at >= (SELECT lo FROM bounds) AND d.event_at < (SELECT hi FROM bounds)) AS held;

-- ==== consent import throughput (issue 11) ====

-- name: consent_stage_create
-- The per-session staging table a batch of consent changes is COPYed into (binary COPY: the
-- cheapest way in for Postgres, no JSON to parse; evidence, rare, comes as JSON text). Temporary (no WAL, local buffers) and emptied
-- by every commit, so a pooled connection carries no rows from one batch to the next.
CREATE TEMP TABLE IF NOT EXISTS consent_stage (
    idx int NOT NULL, address text NOT NULL, purpose text NOT NULL, status text NOT NULL, legal_basis text,
    source text NOT NULL, captured_at timestamptz NOT NULL, policy_version text, double_opt_in_at timestamptz,
    evidence text, effective_from timestamptz, effective_until timestamptz, contact_id text,
    legacy boolean NOT NULL
) ON COMMIT DELETE ROWS;

-- name: consent_apply_staged
-- The staged batch (one change per address and purpose, see consent_stage_create) against the
-- current rows. First a plain read sorts out what is unchanged or stale, which costs no lock and
-- no write (a nightly re-sync of the same file is mostly that); only the rest is locked, in key
-- order, and judged again on the locked row (a concurrent writer may have got there first). New
-- and changed ones update the current row and append to the history. Answers the outcomes in
-- idx order and the ids of the history rows written (the events are made from them).
WITH s AS (
    SELECT idx, address, purpose, status, legal_basis, source, captured_at, policy_version, double_opt_in_at,
           evidence::jsonb AS evidence, effective_from, effective_until, contact_id, legacy
    FROM consent_stage
), pre AS (
    SELECT s.*,
           CASE WHEN c.address IS NULL THEN 'new'
                WHEN s.captured_at < c.captured_at THEN 'stale'
                WHEN (s.status, s.legal_basis, s.source, s.captured_at, s.policy_version, s.double_opt_in_at,
                      s.evidence, s.effective_from, s.effective_until, s.contact_id, s.legacy)
                     IS NOT DISTINCT FROM
                     (c.status, c.legal_basis, c.source, c.captured_at, c.policy_version,
                      c.double_opt_in_at, c.evidence, c.effective_from, c.effective_until,
                      c.contact_id, c.legacy) THEN 'unchanged'
                ELSE 'changed' END AS seen
    -- One primary-key probe per staged change (LIMIT 1 keeps it a probe): a hash join would read
    -- the whole consent table for every batch, and the staging table has no statistics.
    FROM s LEFT JOIN LATERAL (
        SELECT * FROM consent c WHERE c.address = s.address AND c.purpose = s.purpose LIMIT 1
    ) c ON true
), cur AS (
    SELECT c.* FROM pre JOIN consent c ON c.address = pre.address AND c.purpose = pre.purpose
    WHERE pre.seen = 'changed'
    ORDER BY c.address, c.purpose
    FOR UPDATE OF c
), ch AS (
    SELECT p.*, cur.status AS old_status,
           CASE WHEN p.seen <> 'changed' THEN p.seen
                WHEN cur.address IS NULL THEN 'new'
                WHEN p.captured_at < cur.captured_at THEN 'stale'
                WHEN (p.status, p.legal_basis, p.source, p.captured_at, p.policy_version, p.double_opt_in_at,
                      p.evidence, p.effective_from, p.effective_until, p.contact_id, p.legacy)
                     IS NOT DISTINCT FROM
                     (cur.status, cur.legal_basis, cur.source, cur.captured_at, cur.policy_version,
                      cur.double_opt_in_at, cur.evidence, cur.effective_from, cur.effective_until,
                      cur.contact_id, cur.legacy) THEN 'unchanged'
                ELSE 'changed' END AS outcome
    FROM pre p LEFT JOIN cur ON p.seen = 'changed' AND cur.address = p.address AND cur.purpose = p.purpose
), up AS (
    INSERT INTO consent AS c (address, purpose, status, legal_basis, source, captured_at, policy_version,
                              double_opt_in_at, evidence, effective_from, effective_until, contact_id, legacy)
    SELECT address, purpose, status, legal_basis, source, captured_at, policy_version, double_opt_in_at,
           evidence, effective_from, effective_until, contact_id, legacy
    FROM ch WHERE outcome IN ('new', 'changed')
    ORDER BY address, purpose
    ON CONFLICT (address, purpose) DO UPDATE SET
        status = excluded.status, legal_basis = excluded.legal_basis, source = excluded.source,
        captured_at = excluded.captured_at, policy_version = excluded.policy_version,
        double_opt_in_at = excluded.double_opt_in_at, evidence = excluded.evidence,
        effective_from = excluded.effective_from, effective_until = excluded.effective_until,
        contact_id = excluded.contact_id, legacy = excluded.legacy, updated_at = now()
    WHERE c.captured_at <= excluded.captured_at
    RETURNING c.address
), hist AS (
    INSERT INTO consent_history (address, purpose, old_status, status, legal_basis, source, captured_at,
                                 policy_version, double_opt_in_at, evidence, effective_from, effective_until,
                                 contact_id, legacy, actor)
    SELECT address, purpose, CASE WHEN outcome = 'changed' THEN old_status END, status, legal_basis, source,
           captured_at, policy_version, double_opt_in_at, evidence, effective_from, effective_until, contact_id,
           legacy, :actor
    FROM ch WHERE outcome IN ('new', 'changed')
    ORDER BY idx
    RETURNING id
)
SELECT (SELECT array_agg(outcome ORDER BY idx) FROM ch) AS outcomes,
       (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM hist) AS history_ids;

-- name: events_insert_consent_history
-- One consent_changed event per consent_history row (the changes a batch just recorded), built
-- here rather than in Python: a bulk import writes thousands per batch. Times are RFC 3339 in UTC,
-- as the engine writes them elsewhere (microseconds only when there are some).
INSERT INTO events (type, data)
SELECT 'consent_changed', jsonb_build_object(
           'v', :version::int, 'address', h.address, 'purpose', h.purpose, 'old_status', h.old_status,
           'status', h.status, 'legal_basis', h.legal_basis, 'source', h.source,
           'captured_at', to_char(h.captured_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
                          || CASE WHEN extract(microseconds FROM h.captured_at)::bigint % 1000000 <> 0
                                  THEN to_char(h.captured_at AT TIME ZONE 'UTC', '.US') ELSE '' END || '+00:00',
           'policy_version', h.policy_version, 'contact_id', h.contact_id, 'legacy', h.legacy, 'actor', h.actor)
FROM consent_history h WHERE h.id = ANY(:ids::bigint[])
ORDER BY h.id;
