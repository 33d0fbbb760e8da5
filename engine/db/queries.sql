-- Every SQL statement the engine runs, as named blocks. Python calls them by name
-- (engine.db.queries); ":name" placeholders become asyncpg's $n in one place.

-- name: insert_messages
INSERT INTO messages (id, source, mail_from, raw, content, stream, metadata, api_key_id, send_at)
SELECT * FROM unnest(:ids::uuid[], :sources::text[], :mail_froms::text[], :raws::bytea[],
                     :contents::jsonb[], :streams::text[], :metadatas::jsonb[],
                     :api_key_ids::bigint[], :send_ats::timestamptz[]);

-- name: insert_recipients
INSERT INTO recipients (message_id, address, domain, kind, vars, state, stream, priority,
                        next_attempt_at, expires_at)
SELECT u.message_id, u.address, u.domain, u.kind, u.vars, u.state, u.stream, u.priority,
       coalesce(u.next_attempt_at, now()), coalesce(u.next_attempt_at, now()) + make_interval(secs => :max_age)
FROM unnest(:message_ids::uuid[], :addresses::text[], :domains::text[], :kinds::text[],
            :vars::jsonb[], :states::text[], :streams::text[], :priorities::smallint[],
            :next_attempt_ats::timestamptz[])
     AS u(message_id, address, domain, kind, vars, state, stream, priority, next_attempt_at)
RETURNING id, message_id, address, state;

-- name: notify_outbox
-- A wake-up hint for idle delivery workers; they poll anyway (LISTEN is a hint, not a contract).
SELECT pg_notify('engine_outbox', '');

-- name: claim
-- One statement picks ready rows with SKIP LOCKED and leases them, so many
-- workers on many hosts share the outbox without stepping on each other.
WITH picked AS (
    SELECT id FROM recipients
    WHERE state IN ('queued', 'deferred') AND next_attempt_at <= now()
      AND domain <> ALL(:skip_domains::text[])
    ORDER BY priority, next_attempt_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE recipients r
SET state = 'leased', lease_owner = :owner,
    lease_expires_at = now() + make_interval(secs => :lease_seconds), updated_at = now()
FROM picked
WHERE r.id = picked.id
RETURNING r.id, r.message_id, r.address, r.domain, r.kind, r.vars, r.stream, r.priority,
          r.attempts, r.expires_at, r.created_at;

-- name: ack
-- Final outcomes (delivered, bounced, expired, suppressed) for leased rows, in one batch.
UPDATE recipients r
SET state = u.state, attempts = r.attempts + u.attempted, last_code = u.code, last_status = u.status,
    last_reply = u.reply, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(:ids::bigint[], :states::text[], :attempted::int[], :codes::int[], :statuses::text[],
            :replies::text[]) AS u(id, state, attempted, code, status, reply)
WHERE r.id = u.id AND r.state = 'leased' AND r.lease_owner = :owner
RETURNING r.id;

-- name: defer
-- Temporary failures: back to the ready set at a later time, in one batch.
UPDATE recipients r
SET state = 'deferred', attempts = r.attempts + u.attempted, next_attempt_at = u.next_attempt_at,
    last_code = u.code, last_status = u.status, last_reply = u.reply,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(:ids::bigint[], :next_attempt_ats::timestamptz[], :attempted::int[], :codes::int[],
            :statuses::text[], :replies::text[]) AS u(id, next_attempt_at, attempted, code, status, reply)
WHERE r.id = u.id AND r.state = 'leased' AND r.lease_owner = :owner
RETURNING r.id;

-- name: release
-- Give leased rows back untouched (graceful shutdown): no attempt is counted.
UPDATE recipients
SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
WHERE id = ANY(:ids::bigint[]) AND state = 'leased' AND lease_owner = :owner
RETURNING id;

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
SELECT state, stream, domain, count(*)::bigint AS n,
       min(next_attempt_at) FILTER (WHERE state IN ('queued', 'deferred')) AS next_attempt_at
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
RETURNING id;

-- name: queue_release
UPDATE recipients SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
       next_attempt_at = now(), updated_at = now()
WHERE state = 'held' AND (:domain::text IS NULL OR domain = :domain)
  AND (:message_id::uuid IS NULL OR message_id = :message_id)
RETURNING id;

-- name: queue_purge
-- Final, but kept for the record: purged rows end as bounced with the operator's reason.
UPDATE recipients SET state = 'bounced', last_code = NULL, last_status = '5.0.0',
       last_reply = '5.0.0 purged by operator', updated_at = now()
WHERE state IN ('queued', 'deferred', 'held') AND state = ANY(:states::text[])
  AND (:domain::text IS NULL OR domain = :domain)
  AND (:message_id::uuid IS NULL OR message_id = :message_id)
RETURNING id;

-- name: insert_api_key
INSERT INTO api_keys (name, prefix, key_hash, scopes) VALUES (:name, :prefix, :key_hash, :scopes)
RETURNING id, created_at;

-- name: list_api_keys
SELECT id, name, prefix, scopes, created_at, revoked_at, last_used_at FROM api_keys ORDER BY id;

-- name: revoke_api_key
UPDATE api_keys SET revoked_at = now() WHERE name = :name AND revoked_at IS NULL RETURNING id;

-- name: find_api_key
SELECT id, name, scopes FROM api_keys WHERE key_hash = :key_hash AND revoked_at IS NULL;

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
SELECT request_hash, status_code, response FROM idempotency_keys
WHERE api_key_id = :api_key_id AND key = :key;

-- name: idempotency_store
UPDATE idempotency_keys SET status_code = :status_code, response = :response
WHERE api_key_id = :api_key_id AND key = :key;

-- name: idempotency_expire
DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => :ttl);

-- name: ping
SELECT 1;

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
INSERT INTO events (type, recipient_id, message_id, data, created_at)
SELECT u.type, u.recipient_id, u.message_id, u.data, coalesce(u.created_at, now())
FROM unnest(:types::text[], :recipient_ids::bigint[], :message_ids::uuid[], :datas::jsonb[],
            :created_ats::timestamptz[]) AS u(type, recipient_id, message_id, data, created_at);

-- name: event_insert_for_recipient
-- One event for a recipient row, its message id looked up in the same statement; nothing is
-- written when the row no longer exists (a purged message's late open).
INSERT INTO events (type, recipient_id, message_id, data)
SELECT :type::text, r.id, r.message_id, :data::jsonb FROM recipients r WHERE r.id = :recipient_id
RETURNING id;

-- name: event_exists_for_recipient
SELECT EXISTS (SELECT 1 FROM events
               WHERE message_id = :message_id AND recipient_id = :recipient_id AND type = :type);

-- name: events_for_message
SELECT id, type, recipient_id, message_id, data, created_at FROM events
WHERE message_id = :message_id ORDER BY id;

-- name: tracking_recipient
-- What a click or unsubscribe needs: the recipient row and its message's content.
SELECT r.id, r.message_id, r.address, r.vars, r.stream, m.mail_from, (m.raw IS NOT NULL) AS is_raw,
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
