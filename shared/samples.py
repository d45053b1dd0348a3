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
