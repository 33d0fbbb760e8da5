-- Traffic shaping automation (engine.deliver.automation): decisions every worker obeys.

-- One row per (rule, provider, source, campaign): re-firing extends it; history is in events.
CREATE TABLE shaping_decisions (
    rule            text NOT NULL,                  -- rule id, or 'health:complaint_rate' / 'health:bounce_rate'
    provider        text NOT NULL DEFAULT '',       -- shaping provider (group) name
    source          text NOT NULL DEFAULT '',       -- egress source name; '*' = every source
    campaign        text NOT NULL DEFAULT '',       -- hold_campaign: metadata.campaign
    action          text NOT NULL,                  -- suspend | suspend_provider | reduce_rate | cap_connections | hold_campaign | pause_bulk
    params          jsonb NOT NULL DEFAULT '{}'::jsonb,  -- factor, floor, limit, ramp_step, ramp_steps, streams
    reason          text NOT NULL,
    started_at      timestamptz NOT NULL,           -- start of the current episode (first match after quiet)
    expires_at      timestamptz NOT NULL,           -- full action until then; then the ramp
    ramp_until      timestamptz NOT NULL,           -- limits fully back after this
    PRIMARY KEY (rule, provider, source, campaign)
);
CREATE INDEX shaping_decisions_ramp_idx ON shaping_decisions (ramp_until);

-- "N matches per period" counted across workers: one fixed window per (rule, provider, source).
CREATE TABLE shaping_rule_hits (
    rule            text NOT NULL,
    provider        text NOT NULL,
    source          text NOT NULL,
    window_start    timestamptz NOT NULL,
    n               integer NOT NULL,
    PRIMARY KEY (rule, provider, source)
);

-- Final outcomes per campaign and minute, for the hard-bounce-rate hold.
CREATE TABLE campaign_counters (
    campaign        text NOT NULL,
    bucket          timestamptz NOT NULL,
    final           bigint NOT NULL DEFAULT 0,      -- delivered + bounced
    hard            bigint NOT NULL DEFAULT 0,      -- hard bounces (unknown_user, bad_domain)
    PRIMARY KEY (campaign, bucket)
);
CREATE INDEX campaign_counters_bucket_idx ON campaign_counters (bucket);
