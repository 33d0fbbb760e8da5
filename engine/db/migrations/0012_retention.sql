-- Retention (engine.retention): indexes that let the background purge find what is due in
-- small batches, without scanning whole tables. Each purge statement walks one of them oldest
-- first and stops after its batch.

-- Final recipient rows by the time they became final: the recipients (and attempts) purge.
CREATE INDEX recipients_final_idx ON recipients (updated_at)
    WHERE state IN ('delivered', 'bounced', 'expired', 'suppressed');

-- Messages that still hold a body, oldest first; a blanked body (retention's {"purged": true},
-- erasure's {"erased": true}) leaves the index, so the body purge never walks what it already did.
CREATE INDEX messages_body_idx ON messages (created_at)
    WHERE raw IS NOT NULL OR content NOT IN ('{"erased": true}'::jsonb, '{"purged": true}'::jsonb);

-- The events purge keeps events a webhook delivery still waits to send: one probe per event.
CREATE INDEX webhook_deliveries_open_event_idx ON webhook_deliveries (event_id)
    WHERE state IN ('pending', 'sending');
