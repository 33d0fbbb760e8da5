-- Audit log and API key lifecycle: who changed what, keys that rotate, expire and stay on their networks.

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
