"""refund.* and charge.refund.updated events -> `refunds`, and the refunded amount of the payment.

A refund is found by its `re_…` id; the payment's `amount_refunded` is the greatest of the charge's
cumulative figure and the sum of its succeeded refunds (`store.payment_effects.settle`), so a refund that
fails or an old snapshot never shrinks it and a refund seen twice is counted once.
Ranks: pending < requires_action < succeeded < failed < canceled; failed and canceled are terminal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final, Protocol

import msgspec
from psycopg import AsyncConnection

from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.events.charges import ref, settle_intent
from processor.store import objects

STATUS_RANK: Final = {"pending": 0, "requires_action": 1, "succeeded": 2, "failed": 3, "canceled": 4}
TERMINAL: Final = frozenset({"failed", "canceled"})


class Refund(msgspec.Struct, frozen=True):
    id: str
    status: str = "pending"
    amount: int = 0
    currency: str | None = None
    reason: str | None = None
    charge: str | dict[str, Any] | None = None
    payment_intent: str | dict[str, Any] | None = None


async def intent_of_charge(conn: AsyncConnection[Any], charge: str | None) -> str | None:
    if not charge:
        return None
    row = await (
        await conn.execute("SELECT stripe_payment_intent_id FROM charges WHERE id = %s", (charge,))
    ).fetchone()
    return row[0] if row else None


class ChargeChild(Protocol):
    """A refund or a dispute: an object of its own that hangs off a charge / PaymentIntent."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def amount(self) -> int: ...
    @property
    def currency(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def charge(self) -> str | dict[str, Any] | None: ...
    @property
    def payment_intent(self) -> str | dict[str, Any] | None: ...


async def apply_charge_child(
    conn: AsyncConnection[Any],
    table: str,
    obj: ChargeChild,
    event: Event,
    ctx: Context,
    ranks: dict[str, int],
    terminal: frozenset[str],
) -> Applied:
    """Guarded upsert of the child row, then fold it into its payment (refunded amount, dispute state)."""
    charge = ref(obj.charge)
    intent = ref(obj.payment_intent)
    snapshot = objects.Snapshot(
        object_id=obj.id,
        status=obj.status,
        created=event.created,
        ranks=ranks,
        terminal=terminal,
        fields={
            "amount": obj.amount,
            "currency": (obj.currency or "").lower() or None,
            "reason": obj.reason,
        },
        learned={"stripe_payment_intent_id": intent, "stripe_charge_id": charge},
    )
    changed, _, _ = await objects.upsert(conn, table, snapshot)
    if not changed:
        return Applied("stale")
    intent = intent or await intent_of_charge(conn, charge)
    user = await settle_intent(conn, intent, ctx, datetime.fromtimestamp(event.created, UTC))
    return Applied("applied", user)


async def on_refund(conn: AsyncConnection[Any], event: Event, ctx: Context) -> Applied:
    return await apply_charge_child(conn, "refunds", event.object(Refund), event, ctx, STATUS_RANK, TERMINAL)


HANDLERS: Final[dict[str, Handler]] = {
    "refund.created": on_refund,
    "refund.updated": on_refund,
    "refund.failed": on_refund,
    "charge.refund.updated": on_refund,
}
