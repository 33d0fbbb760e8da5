-- Traffic shaping state shared by every worker on every host (engine.deliver.throttle, warmup).

-- Token buckets: one row per bucket; workers lease a few tokens per round trip.
CREATE TABLE throttles (
    key             text PRIMARY KEY,               -- e.g. 'rate:<site>|<source>', 'rate:group:google'
    tokens          double precision NOT NULL,
    rate            double precision NOT NULL,      -- tokens per second
    burst           double precision NOT NULL,      -- bucket size
    granted         double precision NOT NULL DEFAULT 0,   -- tokens handed out by the last take
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Connection slots: a worker holds one lease per open connection; a dead worker's leases expire.
CREATE TABLE connection_leases (
    key             text NOT NULL,                  -- 'conn:<site>|<source>' or 'conn:group:<provider>'
    slot            integer NOT NULL CHECK (slot >= 0),
    owner           text NOT NULL,
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (key, slot)
);
CREATE INDEX connection_leases_owner_idx ON connection_leases (owner);

-- Workers that found no free slot: holders shrink to a fair share so no worker starves.
CREATE TABLE connection_waiters (
    key             text NOT NULL,
    owner           text NOT NULL,
    until           timestamptz NOT NULL,
    PRIMARY KEY (key, owner)
);

-- Warm-up ramps: today's count and the current step of each (ramp, source or sending domain).
CREATE TABLE warmup_state (
    key             text PRIMARY KEY,
    step            integer NOT NULL DEFAULT 0,     -- index into the ramp's schedule
    day             date NOT NULL,
    sent            integer NOT NULL DEFAULT 0,     -- units of today's cap handed to workers
    delivered       integer NOT NULL DEFAULT 0,
    failed          integer NOT NULL DEFAULT 0,
    granted         integer NOT NULL DEFAULT 0,
    last_health     text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Destinations a worker suspended after connection failures (for `engine shaping show`).
CREATE TABLE suspensions (
    domain          text PRIMARY KEY,
    until           timestamptz NOT NULL,
    reason          text NOT NULL,
    owner           text NOT NULL
);
