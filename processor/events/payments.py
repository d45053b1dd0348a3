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
from processor.users import customer_id, resolve_user

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
    intent = event.object(PaymentIntent)
    status = STATUS_BY_EVENT[event.type]
    customer = customer_id(event.data.object)
    await lock_customer(conn, customer)
    user_id = await resolve_user(conn, event.data.object)
    error = intent.last_payment_error
    change = await payments.apply(
        conn,
        payments.PaymentUpdate(
            intent=intent.id,
            session=None,
            status=status,
            created=event.created,
            amount=intent.amount,
            currency=intent.currency.lower(),
            user_id=user_id,
            stripe_customer_id=customer,
            product=product_of(intent.metadata),
            error=(error.decline_code or error.code or error.type) if error and status == "failed" else None,
            metadata=intent.metadata,
        ),
    )
    if change.changed:  # a stale event changes nothing, so there is nothing to derive or announce
        await payment_effects.settle(
            conn, change.payment_id, change.before, ctx, event_time(event), change.current
        )
    return Applied("applied" if change.changed else "stale", user_id)


HANDLERS: Final[dict[str, Handler]] = {event_type: on_payment_intent for event_type in STATUS_BY_EVENT}
