-- depends: 0002.domain
-- Payment requests from backend services, keyed by the client's idempotency key; the stored
-- response is returned for every repeat, also long after Stripe forgot the key.
CREATE TABLE payment_requests (
    idempotency_key   text PRIMARY KEY,
    kind              text NOT NULL,
    user_id           uuid,
    status            text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
    params_hash       text NOT NULL,
    request           jsonb NOT NULL,
    response          jsonb,
    stripe_object_id  text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payment_requests_user_idx ON payment_requests (user_id);

-- Domain events, written in the transaction of the change they announce and relayed to
-- paybus.events with confirms. `id` is stable: consumers dedupe on it.
CREATE TABLE outbox (
    seq           bigserial PRIMARY KEY,
    id            uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    event_type    text NOT NULL,
    user_id       uuid,
    payload       jsonb NOT NULL,
    traceparent   text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished_idx ON outbox (seq) WHERE published_at IS NULL;
