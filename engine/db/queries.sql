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

-- name: claim
-- One statement picks ready rows with SKIP LOCKED and leases them, so many
-- workers on many hosts share the outbox without stepping on each other.
WITH picked AS (
    SELECT id FROM recipients
    WHERE state IN ('queued', 'deferred') AND next_attempt_at <= now()
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

-- name: get_message_raw
SELECT raw FROM messages WHERE id = :id;

-- name: queue_stats
SELECT state, stream, domain, count(*)::bigint AS n
FROM recipients GROUP BY state, stream, domain ORDER BY state, stream, domain;

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
