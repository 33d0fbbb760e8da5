-- Consent and identity: consent records with history, contact ids per recipient, erasure.

-- Who each recipient is in the CRM/CDP (carried to every event), and why a row was stopped.
ALTER TABLE recipients ADD COLUMN contact_id text;
ALTER TABLE recipients ADD COLUMN external jsonb;
ALTER TABLE recipients ADD COLUMN reason text;
-- Mail to one address: revocations and suppressions stop its queued rows, erasure finds every row.
CREATE INDEX recipients_address_idx ON recipients (lower(address));

-- The current consent per (address, purpose), derived from consent_history: every change appends
-- there and updates this row in the same statement.
CREATE TABLE consent (
    address             text NOT NULL,                  -- wholly lower-cased
    purpose             text NOT NULL,
    status              text NOT NULL CHECK (status IN ('granted', 'revoked', 'unknown')),
    legal_basis         text,
    source              text NOT NULL,
    captured_at         timestamptz NOT NULL,
    policy_version      text,
    double_opt_in_at    timestamptz,
    evidence            jsonb,
    effective_from      timestamptz,
    effective_until     timestamptz,
    contact_id          text,
    legacy              boolean NOT NULL DEFAULT false,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (address, purpose)
);
CREATE INDEX consent_contact_idx ON consent (contact_id) WHERE contact_id IS NOT NULL;

CREATE TABLE consent_history (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    address             text NOT NULL,
    purpose             text NOT NULL,
    old_status          text,                           -- NULL: the first record for this address and purpose
    status              text NOT NULL,
    legal_basis         text,
    source              text NOT NULL,
    captured_at         timestamptz NOT NULL,
    policy_version      text,
    double_opt_in_at    timestamptz,
    evidence            jsonb,
    effective_from      timestamptz,
    effective_until     timestamptz,
    contact_id          text,
    legacy              boolean NOT NULL DEFAULT false,
    actor               text NOT NULL,                  -- who: api:<key name>, cli, list-unsubscribe, arf, import:<key>
    recorded_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX consent_history_address_idx ON consent_history (address, id);

-- Erased addresses, as salted hashes only: never mailed again, never readable.
CREATE TABLE do_not_mail (
    hash                bytea PRIMARY KEY,              -- sha256(salt || lower(address))
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE do_not_mail_salt (
    id                  integer PRIMARY KEY CHECK (id = 1),
    salt                bytea NOT NULL
);
INSERT INTO do_not_mail_salt (id, salt)
VALUES (1, decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));

-- Events about an address rather than a recipient row (consent changes): found again on erasure.
CREATE INDEX events_address_idx ON events ((data->>'address')) WHERE recipient_id IS NULL;
