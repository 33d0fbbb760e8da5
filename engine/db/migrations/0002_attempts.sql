-- 0002: one row per delivery attempt, so GET /v1/messages/{id} can show each reply.

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
