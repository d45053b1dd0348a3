ALTER TABLE stripe_events
    DROP COLUMN reapply_requested_at,
    DROP COLUMN reapplied_at,
    DROP COLUMN reapply_count;
