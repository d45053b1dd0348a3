"""charge.dispute.* events -> `disputes`, and the payment's `disputed` / `dispute_status`.

A lost dispute takes away what the payment granted; a won one (or a closed inquiry) gives it back:
entitlements follow the dispute's current state (`store.payment_effects.settle`), not the event.
Ranks: warning_needs_response < warning_under_review < needs_response < under_review <
warning_closed < won < lost; warning_closed, won and lost are terminal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection

from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.events.charges import ref, settle_intent
from processor.events.refunds import intent_of_charge
from processor.store import objects

STATUS_RANK: Final = {
    "warning_needs_response": 0,
    "warning_under_review": 1,
    "needs_response": 2,
    "under_review": 3,
    "warning_closed": 4,
    "won": 5,
    "lost": 6,
}
TERMINAL: Final = frozenset({"warning_closed", "won", "lost"})


class Dispute(msgspec.Struct, frozen=True):
    id: str
    status: str
    amount: int = 0
    currency: str | None = None
    reason: str | None = None
    charge: str | dict[str, Any] | None = None
    payment_intent: str | dict[str, Any] | None = None


async def on_dispute(conn: AsyncConnection[Any], event: Event, ctx: Context) -> Applied:
    dispute = event.object(Dispute)
    charge = ref(dispute.charge)
    intent = ref(dispute.payment_intent)
    changed, _, _ = await objects.upsert(
        conn,
        "disputes",
        dispute.id,
        status=dispute.status,
        created=event.created,
        ranks=STATUS_RANK,
        terminal=TERMINAL,
        fields={
            "amount": dispute.amount,
            "currency": (dispute.currency or "").lower() or None,
            "reason": dispute.reason,
        },
        learned={"stripe_payment_intent_id": intent, "stripe_charge_id": charge},
    )
    if not changed:
        return Applied("stale")
    intent = intent or await intent_of_charge(conn, charge)
    user = await settle_intent(conn, intent, ctx, datetime.fromtimestamp(event.created, UTC))
    return Applied("applied", user)


HANDLERS: Final[dict[str, Handler]] = {
    f"charge.dispute.{name}": on_dispute
    for name in ("created", "updated", "closed", "funds_withdrawn", "funds_reinstated")
}
