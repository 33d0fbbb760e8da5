-- Events out: a commit-ordered cursor over events, webhook endpoints and their deliveries.

-- The transaction that wrote each event. Ids come from a sequence and commit out of order; a
-- reader that pages by (tx, id) and stops below pg_snapshot_xmin(pg_current_snapshot()) only
-- passes transactions that have ended, so it never skips an event that commits late.
ALTER TABLE events ADD COLUMN tx xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX events_cursor_idx ON events (tx, id);
CREATE INDEX events_recipient_idx ON events (recipient_id) WHERE recipient_id IS NOT NULL;

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
