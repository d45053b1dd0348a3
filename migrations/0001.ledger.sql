-- The idempotency ledger and audit log: one row per Stripe event id, forever.
CREATE TABLE stripe_events (
    id            text PRIMARY KEY,
    type          text NOT NULL,
    created       timestamptz NOT NULL,
    livemode      boolean NOT NULL,
    account       text,
    api_version   text,
    object_id     text,
    user_id       uuid,
    payload       jsonb NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    processed_at  timestamptz,
    outcome       text CHECK (outcome IN ('applied', 'ignored', 'stale', 'failed'))
);
CREATE INDEX stripe_events_type_created_idx ON stripe_events (type, created);
CREATE INDEX stripe_events_object_idx ON stripe_events (object_id);
CREATE INDEX stripe_events_user_idx ON stripe_events (user_id);
CREATE INDEX stripe_events_received_idx ON stripe_events (received_at);
