-- depends: 0004.ledger-reapply
-- What the domain handlers need beyond 0002: charges (the link refunds and disputes use to find their
-- PaymentIntent), the payment's paid time and dispute state (entitlements are derived from them), and
-- indexes for linking orphaned rows when a customer's user becomes known.
CREATE TABLE charges (
    id                        text PRIMARY KEY,
    stripe_payment_intent_id  text,
    stripe_customer_id        text,
    amount                    bigint NOT NULL DEFAULT 0,
    amount_refunded           bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    currency                  text,
    status                    text NOT NULL,
    failure_code              text,
    status_event_created      bigint,
    status_rank               smallint,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX charges_intent_idx ON charges (stripe_payment_intent_id);

ALTER TABLE payments
    ADD COLUMN paid_at timestamptz,
    ADD COLUMN dispute_status text;
CREATE INDEX payments_subscription_idx ON payments (subscription_id);
CREATE INDEX payments_unmapped_idx ON payments (created_at) WHERE user_id IS NULL;

ALTER TABLE invoices
    ADD COLUMN number text,
    ADD COLUMN stripe_payment_intent_id text,
    ADD COLUMN paid_at timestamptz;
CREATE INDEX invoices_customer_idx ON invoices (stripe_customer_id);
CREATE INDEX invoices_unmapped_idx ON invoices (created_at) WHERE user_id IS NULL;

CREATE INDEX subscriptions_unmapped_idx ON subscriptions (created_at) WHERE user_id IS NULL;
CREATE INDEX disputes_charge_idx ON disputes (stripe_charge_id);
CREATE INDEX entitlements_user_idx ON entitlements (user_id);

-- The outbox relay LISTENs on this channel: one wake-up per transaction that wrote outbox rows
-- (Postgres folds identical notifications of one transaction), delivered at commit.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('paybus_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
