"""charge.* events -> `charges` (the link from a charge to its PaymentIntent) and the payment's refunds.

`charge.refunded` carries the charge's cumulative `amount_refunded`; the row keeps the greatest value
seen (refunded amounts only grow), and the payment row takes it over in `store.payment_effects.settle`.
Charge ranks: pending < failed < succeeded; failed and succeeded are terminal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection

from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.store import objects, payment_effects
from processor.users import customer_id

STATUS_RANK: Final = {"pending": 0, "failed": 1, "succeeded": 2}
TERMINAL: Final = frozenset({"failed", "succeeded"})


class Charge(msgspec.Struct, frozen=True):
    id: str
    status: str = "pending"
    amount: int = 0
    amount_refunded: int = 0
    currency: str | None = None
    failure_code: str | None = None
    payment_intent: str | dict[str, Any] | None = None


def ref(value: str | dict[str, Any] | None) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


async def settle_intent(
    conn: AsyncConnection[Any], intent: str | None, ctx: Context, at: datetime
) -> str | None:
    """Re-derive the payment of ``intent`` (if paybus has it); return its user."""
    user = None
    for payment_id in await payment_effects.ids_for_intent(conn, intent):
        before = await payment_effects.snapshot(conn, payment_id)
        await payment_effects.settle(conn, payment_id, before, ctx, at)
        if before and before["user_id"]:
            user = str(before["user_id"])
    return user


async def on_charge(conn: AsyncConnection[Any], event: Event, ctx: Context) -> Applied:
    snapshot = charge_snapshot(event)
    changed, _, _ = await objects.upsert(conn, "charges", snapshot)
    if not changed:
        return Applied("stale")
    intent = snapshot.learned["stripe_payment_intent_id"]
    user = await settle_intent(conn, intent, ctx, datetime.fromtimestamp(event.created, UTC))
    return Applied("applied", user)


def charge_snapshot(event: Event) -> objects.Snapshot:
    """What a charge.* event says about its charge row."""
    charge = event.object(Charge)
    return objects.Snapshot(
        object_id=charge.id,
        status=charge.status,
        created=event.created,
        ranks=STATUS_RANK,
        terminal=TERMINAL,
        fields={
            "amount": charge.amount,
            "currency": (charge.currency or "").lower() or None,
            "failure_code": charge.failure_code,
        },
        monotone={"amount_refunded": charge.amount_refunded},
        learned={
            "stripe_payment_intent_id": ref(charge.payment_intent),
            "stripe_customer_id": customer_id(event.data.object),
        },
    )


HANDLERS: Final[dict[str, Handler]] = {
    "charge.succeeded": on_charge,
    "charge.failed": on_charge,
    "charge.refunded": on_charge,
    "charge.captured": on_charge,
    "charge.pending": on_charge,
    "charge.updated": on_charge,
}
