"""Domain events paybus publishes on `paybus.events` (DESIGN §8): the one definition of their payloads.

Each is written to the `outbox` in the transaction of the change it announces and relayed with
publisher confirms. AMQP `message_id` = `id` (the outbox id: stable across re-publishes, so consumers
dedupe on it), routing key = `type`, `content_type` = application/json, body = the struct as JSON.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import msgspec


class DomainEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    id: str
    """The outbox id (UUID); the same on every re-publish of this event."""
    occurred_at: datetime
    """When the change happened: the `created` time of the Stripe event that caused it (UTC)."""
    user_id: str | None
    """The paybus user (UUID), or null while the Stripe customer is not yet mapped to a user."""


class PaymentSucceeded(DomainEvent, frozen=True, kw_only=True, tag="payment.succeeded"):
    payment_id: str
    stripe_payment_intent_id: str | None
    stripe_checkout_session_id: str | None
    mode: str
    amount: int
    currency: str
    product: str | None


class PaymentFailed(DomainEvent, frozen=True, kw_only=True, tag="payment.failed"):
    payment_id: str
    stripe_payment_intent_id: str | None
    stripe_checkout_session_id: str | None
    amount: int
    currency: str
    product: str | None
    error: str | None
    """Stripe's decline code or error code of the failed attempt; the payment may still be retried."""


class PaymentRefunded(DomainEvent, frozen=True, kw_only=True, tag="payment.refunded"):
    payment_id: str
    stripe_payment_intent_id: str | None
    amount: int
    amount_refunded: int
    """The total refunded so far (it only grows); `fully_refunded` when it reaches `amount`."""
    currency: str
    fully_refunded: bool


class SubscriptionUpdated(DomainEvent, frozen=True, kw_only=True, tag="subscription.updated"):
    subscription_id: str
    status: str
    previous_status: str | None
    """null when paybus sees the subscription for the first time."""
    price_id: str | None
    product: str | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    canceled_at: datetime | None
    trial_end: datetime | None


class EntitlementGranted(DomainEvent, frozen=True, kw_only=True, tag="entitlement.granted"):
    """Access to `feature` starts, or its end moves (then `expires_at` is the new end)."""

    feature: str
    source_type: str
    source_id: str
    product: str | None
    expires_at: datetime | None
    """Access ends at this time without a further event (grace periods, `access_days`); null = no end."""


class EntitlementRevoked(DomainEvent, frozen=True, kw_only=True, tag="entitlement.revoked"):
    feature: str
    source_type: str
    source_id: str
    product: str | None
    reason: str
    """Why: an ending status (`canceled`, `unpaid`, …), `refunded`, `dispute-lost` or `product-changed`."""


AnyDomainEvent = (
    PaymentSucceeded
    | PaymentFailed
    | PaymentRefunded
    | SubscriptionUpdated
    | EntitlementGranted
    | EntitlementRevoked
)
DOMAIN_EVENT_TYPES: Final = (
    PaymentSucceeded,
    PaymentFailed,
    PaymentRefunded,
    SubscriptionUpdated,
    EntitlementGranted,
    EntitlementRevoked,
)
ROUTING_KEYS: Final = tuple(str(cls.__struct_config__.tag) for cls in DOMAIN_EVENT_TYPES)

_decoder: Final = msgspec.json.Decoder(AnyDomainEvent)


def encode(event: DomainEvent) -> bytes:
    return msgspec.json.encode(event)


def decode(body: bytes) -> AnyDomainEvent:
    """Parse a message from `paybus.events` (what a downstream consumer does)."""
    event: AnyDomainEvent = _decoder.decode(body)
    return event
