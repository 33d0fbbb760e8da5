-- Analytics export: where each destination stands in the event stream, and the batches it wrote.

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
