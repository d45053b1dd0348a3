"""payment_intent.* events -> the `payments` row of the PaymentIntent.

Ordering rule (DESIGN §9.2), applied in one guarded upsert so concurrent deliveries serialise on the row:
an event sets the status when its key (terminal, created, rank) is greater than the row's, where
terminal = status in (succeeded, canceled) and rank follows the lifecycle
open < requires_action < processing < failed < canceled < succeeded. So a newer event wins, a same-second
tie goes to the later lifecycle step, and nothing ever replaces a terminal status with a non-terminal one.
`failed` is not terminal: a PaymentIntent whose attempt failed can be retried and succeed later.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.users import customer_id, resolve_user

STATUS_RANK: Final = {
    "open": 0,
    "requires_action": 1,
    "processing": 2,
    "failed": 3,
    "canceled": 4,
    "succeeded": 5,
}
TERMINAL: Final = frozenset({"succeeded", "canceled"})

STATUS_BY_EVENT: Final = {
    "payment_intent.created": "open",
    "payment_intent.requires_action": "requires_action",
    "payment_intent.processing": "processing",
    "payment_intent.succeeded": "succeeded",
    "payment_intent.payment_failed": "failed",
    "payment_intent.canceled": "canceled",
}


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


_UPSERT: Final = """
INSERT INTO payments AS p (user_id, stripe_payment_intent_id, stripe_customer_id, amount, currency, status,
                           product, last_error, metadata, status_event_created, status_rank)
VALUES (%(user_id)s, %(intent)s, %(customer)s, %(amount)s, %(currency)s, %(status)s,
        %(product)s, %(error)s, %(metadata)s, %(created)s, %(rank)s)
ON CONFLICT (stripe_payment_intent_id) DO UPDATE
   SET status = EXCLUDED.status,
       amount = EXCLUDED.amount,
       currency = EXCLUDED.currency,
       last_error = EXCLUDED.last_error,
       metadata = p.metadata || EXCLUDED.metadata,
       user_id = COALESCE(p.user_id, EXCLUDED.user_id),
       stripe_customer_id = COALESCE(EXCLUDED.stripe_customer_id, p.stripe_customer_id),
       product = COALESCE(p.product, EXCLUDED.product),
       status_event_created = EXCLUDED.status_event_created,
       status_rank = EXCLUDED.status_rank,
       updated_at = now()
 WHERE (EXCLUDED.status IN ('succeeded', 'canceled'), EXCLUDED.status_event_created, EXCLUDED.status_rank)
     > (p.status IN ('succeeded', 'canceled'),
        COALESCE(p.status_event_created, -1),
        COALESCE(p.status_rank, -1))
RETURNING p.id
"""

# A stale event still teaches us who the payment belongs to.
_LINK_USER: Final = """
UPDATE payments SET user_id = %(user_id)s, updated_at = now()
 WHERE stripe_payment_intent_id = %(intent)s AND user_id IS NULL AND %(user_id)s::uuid IS NOT NULL
"""


async def on_payment_intent(conn: AsyncConnection[Any], event: Event, ctx: Context) -> Applied:
    intent = event.object(PaymentIntent)
    status = STATUS_BY_EVENT[event.type]
    user_id = await resolve_user(conn, event.data.object)
    error = intent.last_payment_error
    params = {
        "user_id": user_id,
        "intent": intent.id,
        "customer": customer_id(event.data.object),
        "amount": intent.amount,
        "currency": intent.currency.lower(),
        "status": status,
        "product": intent.metadata.get("product")
        if isinstance(intent.metadata.get("product"), str)
        else None,
        "error": (error.decline_code or error.code or error.type) if error and status == "failed" else None,
        "metadata": Jsonb(intent.metadata),
        "created": event.created,
        "rank": STATUS_RANK[status],
    }
    row = await (await conn.execute(_UPSERT, params)).fetchone()
    if row is None:
        await conn.execute(_LINK_USER, params)
        return Applied("stale", user_id)
    return Applied("applied", user_id)


HANDLERS: Final[dict[str, Handler]] = {event_type: on_payment_intent for event_type in STATUS_BY_EVENT}
