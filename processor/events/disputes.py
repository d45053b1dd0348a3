"""charge.dispute.* events -> `disputes`, and the payment's `disputed` / `dispute_status`.

A lost dispute takes away what the payment granted; a won one (or a closed inquiry) gives it back:
entitlements follow the dispute's current state (`store.payment_effects.settle`), not the event.
Ranks: warning_needs_response < warning_under_review < needs_response < under_review <
warning_closed < won < lost; warning_closed, won and lost are terminal.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from psycopg import AsyncConnection

from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.events.refunds import apply_charge_child

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
    return await apply_charge_child(
        conn, "disputes", event.object(Dispute), event, ctx, STATUS_RANK, TERMINAL
    )


HANDLERS: Final[dict[str, Handler]] = {
    f"charge.dispute.{name}": on_dispute
    for name in ("created", "updated", "closed", "funds_withdrawn", "funds_reinstated")
}
