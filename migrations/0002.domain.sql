-- depends: 0001.ledger
-- State kept from Stripe events. Every object row carries the guard of the event that last set its
-- status (`status_event_created`, `status_rank`), so out-of-order deliveries cannot regress it.
CREATE TABLE stripe_customers (
    stripe_customer_id  text PRIMARY KEY,
    user_id             uuid UNIQUE,
    email               text,
    name                text,
    deleted             boolean NOT NULL DEFAULT false,
    event_created       bigint,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE payments (
    id                          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id                     uuid,
    stripe_payment_intent_id    text UNIQUE,
    stripe_checkout_session_id  text UNIQUE,
    stripe_customer_id          text,
    subscription_id             text,
    mode                        text NOT NULL DEFAULT 'payment' CHECK (mode IN ('payment', 'subscription', 'setup')),
    amount                      bigint NOT NULL DEFAULT 0 CHECK (amount >= 0),
    currency                    text NOT NULL DEFAULT 'inr',
    status                      text NOT NULL DEFAULT 'open'
        CHECK (status IN ('open', 'requires_action', 'processing', 'succeeded', 'failed', 'canceled')),
    amount_refunded             bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    disputed                    boolean NOT NULL DEFAULT false,
    product                     text,
    last_error                  text,
    metadata                    jsonb NOT NULL DEFAULT '{}'::jsonb,
    status_event_created        bigint,
    status_rank                 smallint,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_user_idx ON payments (user_id);
CREATE INDEX payments_status_idx ON payments (status);
CREATE INDEX payments_customer_idx ON payments (stripe_customer_id);

CREATE TABLE subscriptions (
    id                    text PRIMARY KEY,
    user_id               uuid,
    stripe_customer_id    text,
    status                text NOT NULL,
    price_id              text,
    product               text,
    current_period_start  timestamptz,
    current_period_end    timestamptz,
    cancel_at_period_end  boolean NOT NULL DEFAULT false,
    canceled_at           timestamptz,
    ended_at              timestamptz,
    trial_end             timestamptz,
    metadata              jsonb NOT NULL DEFAULT '{}'::jsonb,
    status_event_created  bigint,
    status_rank           smallint,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_user_idx ON subscriptions (user_id);
CREATE INDEX subscriptions_customer_idx ON subscriptions (stripe_customer_id);

CREATE TABLE invoices (
    id                  text PRIMARY KEY,
    subscription_id     text,
    user_id             uuid,
    stripe_customer_id  text,
    amount_due          bigint NOT NULL DEFAULT 0,
    amount_paid         bigint NOT NULL DEFAULT 0,
    currency            text NOT NULL DEFAULT 'inr',
    status              text,
    hosted_invoice_url  text,
    invoice_pdf         text,
    period_start        timestamptz,
    period_end          timestamptz,
    status_event_created bigint,
    status_rank          smallint,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX invoices_user_idx ON invoices (user_id);
CREATE INDEX invoices_subscription_idx ON invoices (subscription_id);

CREATE TABLE refunds (
    id                        text PRIMARY KEY,
    stripe_payment_intent_id  text,
    stripe_charge_id          text,
    amount                    bigint NOT NULL DEFAULT 0,
    currency                  text,
    status                    text,
    reason                    text,
    status_event_created      bigint,
    status_rank               smallint,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refunds_intent_idx ON refunds (stripe_payment_intent_id);
CREATE INDEX refunds_charge_idx ON refunds (stripe_charge_id);

CREATE TABLE disputes (
    id                        text PRIMARY KEY,
    stripe_payment_intent_id  text,
    stripe_charge_id          text,
    amount                    bigint NOT NULL DEFAULT 0,
    currency                  text,
    status                    text NOT NULL,
    reason                    text,
    status_event_created      bigint,
    status_rank               smallint,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX disputes_intent_idx ON disputes (stripe_payment_intent_id);

CREATE TABLE entitlements (
    id           bigserial PRIMARY KEY,
    user_id      uuid NOT NULL,
    feature      text NOT NULL,
    source_type  text NOT NULL CHECK (source_type IN ('payment', 'subscription')),
    source_id    text NOT NULL,
    product      text,
    active       boolean NOT NULL,
    reason       text,
    granted_at   timestamptz,
    revoked_at   timestamptz,
    expires_at   timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, feature, source_id)
);
CREATE INDEX entitlements_active_idx ON entitlements (user_id, feature) WHERE active;
CREATE INDEX entitlements_source_idx ON entitlements (source_id);

-- "May user U use feature F now?": SELECT 1 FROM active_entitlements WHERE user_id = $1 AND feature = $2
-- Expiry is honoured here, so no job has to flip rows when access_days or a grace period end.
CREATE VIEW active_entitlements AS
    SELECT user_id, feature, source_type, source_id, product, granted_at, expires_at
      FROM entitlements
     WHERE active AND (expires_at IS NULL OR expires_at > now());
