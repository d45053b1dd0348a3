"""Realistic Stripe events built from Stripe's own example objects (fixtures3.json, MIT)."""

from __future__ import annotations

import copy
import json
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any, Final

FIXTURES: Final = Path(__file__).parent / "stripe_fixtures" / "fixtures3.json"
API_VERSION: Final = "2026-10-28.endive"

# event type prefix -> fixture resource name
_RESOURCE_BY_PREFIX: Final = {
    "payment_intent": "payment_intent",
    "checkout.session": "checkout.session",
    "charge.dispute": "dispute",
    "charge.refund": "refund",
    "charge": "charge",
    "refund": "refund",
    "customer.subscription": "subscription",
    "customer": "customer",
    "invoice": "invoice",
}
_PI_STATUS: Final = {
    "payment_intent.created": "requires_payment_method",
    "payment_intent.requires_action": "requires_action",
    "payment_intent.processing": "processing",
    "payment_intent.succeeded": "succeeded",
    "payment_intent.payment_failed": "requires_payment_method",
    "payment_intent.canceled": "canceled",
}


@cache
def _resources() -> dict[str, Any]:
    return dict(json.loads(FIXTURES.read_text())["resources"])


def fixture(resource: str) -> dict[str, Any]:
    """A fresh deep copy of Stripe's example object for ``resource``."""
    return copy.deepcopy(_resources()[resource])


def resource_for(event_type: str) -> str:
    for prefix, resource in _RESOURCE_BY_PREFIX.items():
        if event_type.startswith(prefix + "."):
            return resource
    raise KeyError(f"no sample object for event type {event_type!r}")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def payment_intent(
    *,
    intent_id: str | None = None,
    amount: int = 49900,
    currency: str = "inr",
    user_id: str | None = None,
    status: str = "requires_payment_method",
    product: str | None = None,
    customer: str | None = None,
) -> dict[str, Any]:
    obj = fixture("payment_intent")
    obj_id = intent_id or new_id("pi")
    metadata: dict[str, str] = {}
    if user_id:
        metadata["user_id"] = user_id
    if product:
        metadata["product"] = product
    obj.update(
        id=obj_id,
        amount=amount,
        currency=currency,
        status=status,
        metadata=metadata,
        customer=customer,
        client_secret=f"{obj_id}_secret_{uuid.uuid4().hex[:24]}",
        created=int(time.time()),
        last_payment_error=None,
        next_action=None,
        canceled_at=None,
    )
    if status == "succeeded":
        obj["amount_received"] = amount
        obj["latest_charge"] = new_id("ch")
    if status == "requires_action":
        obj["next_action"] = {"type": "use_stripe_sdk", "use_stripe_sdk": {"type": "three_d_secure_redirect"}}
    if status == "canceled":
        obj["canceled_at"] = int(time.time())
        obj["cancellation_reason"] = "requested_by_customer"
    return obj


def event(
    event_type: str,
    obj: dict[str, Any],
    *,
    created: int | None = None,
    event_id: str | None = None,
    livemode: bool = False,
    api_version: str = API_VERSION,
) -> dict[str, Any]:
    """A snapshot event envelope around ``obj``, shaped like Stripe's `event` fixture."""
    envelope = fixture("event")
    envelope.update(
        id=event_id or new_id("evt"),
        type=event_type,
        created=created or int(time.time()),
        livemode=livemode,
        api_version=api_version,
        data={"object": obj},
        pending_webhooks=1,
        request={"id": new_id("req"), "idempotency_key": str(uuid.uuid4())},
    )
    return envelope


def sample_event(
    event_type: str, *, user_id: str | None = None, created: int | None = None
) -> dict[str, Any]:
    """A realistic event of ``event_type``; payment_intent.* get a consistent status and a user."""
    user_id = user_id or str(uuid.uuid4())
    if event_type in _PI_STATUS:
        obj = payment_intent(user_id=user_id, status=_PI_STATUS[event_type])
        if event_type == "payment_intent.payment_failed":
            obj["last_payment_error"] = {
                "type": "card_error",
                "code": "card_declined",
                "decline_code": "generic_decline",
            }
        return event(event_type, obj, created=created)
    obj = fixture(resource_for(event_type))
    obj["id"] = new_id(str(obj.get("id", "obj")).split("_", 1)[0])
    if isinstance(obj.get("metadata"), dict):
        obj["metadata"] = {**obj["metadata"], "user_id": user_id}
    return event(event_type, obj, created=created)


def encode(envelope: dict[str, Any]) -> bytes:
    return json.dumps(envelope, separators=(",", ":")).encode()


# Builders for the other object families (issue 3). Each takes the ids and facts a test controls and
# fills the rest from Stripe's example object, so payloads keep Stripe's real shape.


def _metadata(user_id: str | None, product: str | None = None) -> dict[str, str]:
    metadata = {}
    if user_id:
        metadata["user_id"] = user_id
    if product:
        metadata["product"] = product
    return metadata


def checkout_session(
    *,
    session_id: str | None = None,
    mode: str = "payment",
    payment_status: str = "paid",
    status: str = "complete",
    intent_id: str | None = None,
    subscription_id: str | None = None,
    customer: str | None = None,
    client_reference_id: str | None = None,
    user_id: str | None = None,
    product: str | None = None,
    amount_total: int = 49900,
    currency: str = "inr",
) -> dict[str, Any]:
    obj = fixture("checkout.session")
    obj.update(
        id=session_id or new_id("cs_test"),
        mode=mode,
        payment_status=payment_status,
        status=status,
        payment_intent=intent_id,
        subscription=subscription_id,
        customer=customer,
        client_reference_id=client_reference_id,
        metadata=_metadata(user_id, product),
        amount_total=amount_total,
        amount_subtotal=amount_total,
        currency=currency,
        created=int(time.time()),
    )
    return obj


def charge(
    *,
    charge_id: str | None = None,
    intent_id: str | None = None,
    amount: int = 49900,
    amount_refunded: int = 0,
    status: str = "succeeded",
    currency: str = "inr",
    customer: str | None = None,
) -> dict[str, Any]:
    obj = fixture("charge")
    obj.update(
        id=charge_id or new_id("ch"),
        payment_intent=intent_id,
        amount=amount,
        amount_captured=amount,
        amount_refunded=amount_refunded,
        refunded=amount_refunded >= amount,
        status=status,
        currency=currency,
        customer=customer,
        paid=status == "succeeded",
        captured=status == "succeeded",
        failure_code="card_declined" if status == "failed" else None,
        created=int(time.time()),
    )
    return obj


def refund(
    *,
    refund_id: str | None = None,
    charge_id: str | None = None,
    intent_id: str | None = None,
    amount: int = 10000,
    status: str = "succeeded",
    currency: str = "inr",
) -> dict[str, Any]:
    obj = fixture("refund")
    obj.update(
        id=refund_id or new_id("re"),
        charge=charge_id,
        payment_intent=intent_id,
        amount=amount,
        status=status,
        currency=currency,
        reason="requested_by_customer",
        created=int(time.time()),
    )
    return obj


def dispute(
    *,
    dispute_id: str | None = None,
    charge_id: str | None = None,
    intent_id: str | None = None,
    amount: int = 49900,
    status: str = "needs_response",
    currency: str = "inr",
) -> dict[str, Any]:
    obj = fixture("dispute")
    obj.update(
        id=dispute_id or new_id("dp"),
        charge=charge_id,
        payment_intent=intent_id,
        amount=amount,
        status=status,
        currency=currency,
        reason="fraudulent",
        created=int(time.time()),
    )
    return obj


def customer(
    *, customer_id: str | None = None, user_id: str | None = None, email: str | None = None
) -> dict[str, Any]:
    obj = fixture("customer")
    obj.update(
        id=customer_id or new_id("cus"),
        metadata=_metadata(user_id),
        email=email,
        created=int(time.time()),
        discount=None,
    )
    return obj


def subscription(
    *,
    subscription_id: str | None = None,
    status: str = "active",
    customer: str | None = None,
    price_id: str = "price_1PgafmB7WZ01zgkW6dKueIc5",
    user_id: str | None = None,
    period_start: int | None = None,
    period_end: int | None = None,
    cancel_at_period_end: bool = False,
    canceled_at: int | None = None,
    trial_end: int | None = None,
    periods_on_items: bool = True,
) -> dict[str, Any]:
    """A subscription; current_period_* on its item (API >= 2025-03-31) or on the subscription (older)."""
    obj = fixture("subscription")
    sub_id = subscription_id or new_id("sub")
    start = period_start if period_start is not None else int(time.time())
    end = period_end if period_end is not None else start + 30 * 86400
    item = obj["items"]["data"][0]
    item.update(id=new_id("si"), subscription=sub_id)
    item["price"]["id"] = price_id
    for key in ("current_period_start", "current_period_end"):
        item.pop(key, None)
        obj.pop(key, None)
    target = item if periods_on_items else obj
    target.update(current_period_start=start, current_period_end=end)
    obj["items"]["url"] = f"/v1/subscription_items?subscription={sub_id}"
    obj.update(
        id=sub_id,
        status=status,
        customer=customer,
        metadata=_metadata(user_id),
        cancel_at_period_end=cancel_at_period_end,
        cancel_at=end if cancel_at_period_end else None,
        canceled_at=canceled_at,
        ended_at=canceled_at if status == "canceled" else None,
        trial_end=trial_end,
        trial_start=start if trial_end else None,
        created=start,
        start_date=start,
        billing_cycle_anchor=start,
        pending_update=None,
        schedule=None,
    )
    return obj


def invoice(
    *,
    invoice_id: str | None = None,
    status: str = "paid",
    subscription_id: str | None = None,
    customer: str | None = None,
    amount: int = 49900,
    currency: str = "inr",
    period_start: int | None = None,
    period_end: int | None = None,
) -> dict[str, Any]:
    """A subscription invoice shaped like API >= 2025-03-31 (subscription under `parent`)."""
    obj = fixture("invoice")
    inv_id = invoice_id or new_id("in")
    start = period_start if period_start is not None else int(time.time())
    end = period_end if period_end is not None else start + 30 * 86400
    paid = status == "paid"
    line = obj["lines"]["data"][0]
    line.update(
        id=new_id("il"), invoice=inv_id, amount=amount, currency=currency, period={"start": start, "end": end}
    )
    line["parent"] = {
        "type": "subscription_item_details",
        "invoice_item_details": None,
        "subscription_item_details": {
            "invoice_item": None,
            "proration": False,
            "proration_details": None,
            "subscription": subscription_id,
            "subscription_item": new_id("si"),
        },
    }
    obj["lines"]["url"] = f"/v1/invoices/{inv_id}/lines"
    obj.update(
        id=inv_id,
        status=status,
        customer=customer,
        amount_due=amount,
        amount_paid=amount if paid else 0,
        amount_remaining=0 if paid else amount,
        total=amount,
        subtotal=amount,
        currency=currency,
        number=f"INV-{inv_id[-8:].upper()}",
        billing_reason="subscription_cycle",
        period_start=start,
        period_end=start,
        hosted_invoice_url=None if status == "draft" else f"https://invoice.stripe.com/i/{inv_id}",
        invoice_pdf=None if status == "draft" else f"https://pay.stripe.com/invoice/{inv_id}/pdf",
        parent={
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"metadata": {}, "subscription": subscription_id},
        },
        status_transitions={
            "finalized_at": start,
            "marked_uncollectible_at": None,
            "paid_at": start if paid else None,
            "voided_at": None,
        },
        amount_overpaid=0,
        last_finalization_error=None,
        from_invoice=None,
        created=start,
    )
    return obj
