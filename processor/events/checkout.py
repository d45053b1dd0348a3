"""checkout.session.* events -> the `payments` row of the session (payment and subscription mode).

The session's row is the PaymentIntent's row when the session names one (`store.payments` merges
them whatever arrives first). Status: completed + paid (or no payment required) → succeeded;
completed + unpaid (an async method such as a bank debit is still running) → processing;
async_payment_succeeded → succeeded; async_payment_failed → failed; expired → canceled — all under
the same guard as payment_intent.* events.

A session naming both a customer and a user (`client_reference_id` / `metadata.user_id`) teaches the
customer -> user mapping, so a subscription bought through Checkout is linked to its user even when
the subscription's own events carry no user.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection

from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.events.customers import map_customer
from processor.events.subscriptions import product_key
from processor.store import payment_effects, payments
from processor.store.locks import lock_customer
from processor.users import customer_id, resolve_user, user_from_object


class Price(msgspec.Struct, frozen=True):
    id: str


class LineItem(msgspec.Struct, frozen=True):
    price: Price | None = None


class LineItems(msgspec.Struct, frozen=True):
    data: list[LineItem] = []


class Session(msgspec.Struct, frozen=True):
    id: str
    mode: str = "payment"
    payment_status: str = "unpaid"
    amount_total: int | None = None
    currency: str | None = None
    metadata: dict[str, Any] | None = None
    line_items: LineItems | None = None  # present only when expanded


def status_of(event_type: str, payment_status: str) -> str:
    if event_type == "checkout.session.completed":
        return "processing" if payment_status == "unpaid" else "succeeded"
    return {
        "checkout.session.async_payment_succeeded": "succeeded",
        "checkout.session.async_payment_failed": "failed",
        "checkout.session.expired": "canceled",
    }[event_type]


def _ref(value: object) -> str | None:
    if isinstance(value, dict):  # expanded
        value = value.get("id")
    return value if isinstance(value, str) and value else None


async def on_session(conn: AsyncConnection[Any], event: Event, ctx: Context) -> Applied:
    session = event.object(Session)
    obj = event.data.object
    customer = customer_id(obj)
    at = datetime.fromtimestamp(event.created, UTC)
    named_user = user_from_object(obj)
    await lock_customer(conn, customer, exclusive=named_user is not None)
    user_id = await resolve_user(conn, obj)
    metadata = session.metadata or {}
    price = next((li.price.id for li in (session.line_items or LineItems()).data if li.price), None)
    mode = session.mode if session.mode in ("payment", "subscription", "setup") else "payment"
    change = await payments.apply(
        conn,
        payments.PaymentUpdate(
            intent=_ref(obj.get("payment_intent")),
            session=session.id,
            status=status_of(event.type, session.payment_status),
            created=event.created,
            mode=mode,
            amount=session.amount_total,
            currency=session.currency.lower() if session.currency else None,
            user_id=user_id,
            stripe_customer_id=customer,
            subscription_id=_ref(obj.get("subscription")),
            product=product_key(ctx.catalog, metadata, price),
            metadata=metadata,
        ),
    )
    if change.changed:
        await payment_effects.settle(conn, change.payment_id, change.before, ctx, at, change.current)
    linked = False
    if customer and named_user:
        # After the session's own row: linking takes row locks on other payments without their key
        # locks, and a lock on this session's keys must never be requested while holding those.
        linked = await map_customer(conn, customer, named_user, ctx, at)
    return Applied("applied" if change.changed or linked else "stale", user_id)


HANDLERS: Final[dict[str, Handler]] = {
    f"checkout.session.{name}": on_session
    for name in ("completed", "async_payment_succeeded", "async_payment_failed", "expired")
}
