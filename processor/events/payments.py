"""payment_intent.* events -> the `payments` row of the PaymentIntent.

The status follows the ordering guard (`processor.ordering`) with the payment ranks in
`processor.store.payments`: open < requires_action < processing < failed < canceled < succeeded,
succeeded and canceled terminal. So a newer event wins, a same-second tie goes to the later lifecycle
step, and nothing replaces a terminal status. `failed` is not terminal: a PaymentIntent whose attempt
failed can be retried and succeed later.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection

from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.store import payment_effects, payments
from processor.store.locks import lock_customer
from processor.users import customer_id, resolve_user, user_from_object

STATUS_BY_EVENT: Final = {
    "payment_intent.created": "open",
    "payment_intent.requires_action": "requires_action",
    "payment_intent.processing": "processing",
    "payment_intent.succeeded": "succeeded",
    "payment_intent.payment_failed": "failed",
    "payment_intent.canceled": "canceled",
}
# Kept for callers that imported them from here.
STATUS_RANK: Final = payments.STATUS_RANK
TERMINAL: Final = payments.TERMINAL


class LastPaymentError(msgspec.Struct, frozen=True):
    code: str | None = None
    decline_code: str | None = None
    type: str | None = None


class PaymentIntent(msgspec.Struct, frozen=True):
    id: str
    amount: int = 0
    currency: str = "inr"
    metadata: dict[str, Any] = {}
    last_payment_error: LastPaymentError | None = None


def product_of(metadata: dict[str, Any]) -> str | None:
    value = metadata.get("product")
    return value if isinstance(value, str) and value else None


def event_time(event: Event) -> datetime:
    return datetime.fromtimestamp(event.created, UTC)


async def on_payment_intent(conn: AsyncConnection[Any], event: Event, ctx: Context) -> Applied:
    upd = intent_update(event)  # the payload is checked before anything is locked or read
    await lock_customer(conn, upd.stripe_customer_id)
    if upd.user_id is None:  # then the customer's user, if it has one
        upd = msgspec.structs.replace(upd, user_id=await resolve_user(conn, event.data.object))
    change = await payments.apply(conn, upd)
    if change.changed:  # a stale event changes nothing, so there is nothing to derive or announce
        await payment_effects.settle(
            conn, change.payment_id, change.before, ctx, event_time(event), change.current
        )
    return Applied("applied" if change.changed else "stale", upd.user_id)


def intent_update(event: Event) -> payments.PaymentUpdate:
    """What a payment_intent.* event says about its payment; its user only if the object names one."""
    intent = event.object(PaymentIntent)
    status = STATUS_BY_EVENT[event.type]
    error = intent.last_payment_error
    return payments.PaymentUpdate(
        intent=intent.id,
        session=None,
        status=status,
        created=event.created,
        amount=intent.amount,
        currency=intent.currency.lower(),
        user_id=user_from_object(event.data.object),
        stripe_customer_id=customer_id(event.data.object),
        product=product_of(intent.metadata),
        error=(error.decline_code or error.code or error.type) if error and status == "failed" else None,
        metadata=intent.metadata,
    )


HANDLERS: Final[dict[str, Handler]] = {event_type: on_payment_intent for event_type in STATUS_BY_EVENT}
