-- Feedback loop: cheap lookups of pending mail by address, and per-minute reputation counters.

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
