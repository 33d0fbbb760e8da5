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
