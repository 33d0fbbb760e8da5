-- 0003: uploaded templates (immutable versions), the event log, suppressions.

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
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_created_idx ON events (created_at);
CREATE INDEX events_message_idx ON events (message_id);

CREATE TABLE suppressions (
    address         text NOT NULL,                  -- wholly lower-cased (engine.suppression.normalize_address)
    scope           text NOT NULL,                  -- a stream name, or '*' for every stream
    reason          text NOT NULL,
    source          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (address, scope)
);
