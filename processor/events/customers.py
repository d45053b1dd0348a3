"""customer.* events -> `stripe_customers`, and linking rows that arrived before their user was known.

A customer's user comes from `metadata.user_id` (set by paybus when it creates customers). Rows
written while the customer had no user keep `user_id` NULL ("unmapped", easy to find); when the
mapping appears — here, or from a Checkout Session naming both — every such payment, subscription and
invoice of the customer is linked and its entitlements derived. The newer customer event wins;
`deleted` is terminal; a user, once known, is never unlearned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import psycopg
from psycopg import AsyncConnection

from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.store import payment_effects, subscriptions
from processor.store.locks import claim, lock_customer, shared_transaction
from processor.users import user_from_object


class Customer(msgspec.Struct, frozen=True):
    id: str
    email: str | None = None
    name: str | None = None


# Unless the user already has another customer (`user_id` is unique).
_MAP: Final = """
INSERT INTO stripe_customers (stripe_customer_id, user_id)
SELECT %(customer)s, %(user)s
 WHERE NOT EXISTS (SELECT 1 FROM stripe_customers
                    WHERE user_id = %(user)s AND stripe_customer_id <> %(customer)s)
ON CONFLICT (stripe_customer_id)
DO UPDATE SET user_id = EXCLUDED.user_id, updated_at = now()
 WHERE stripe_customers.user_id IS NULL
RETURNING 1
"""
# The customer's unmapped rows of all three tables, linked in one statement.
_LINK: Final = """
WITH p AS (UPDATE payments SET user_id = %(user)s, updated_at = now()
            WHERE stripe_customer_id = %(customer)s AND user_id IS NULL
           RETURNING id::text, stripe_payment_intent_id, stripe_checkout_session_id),
     s AS (UPDATE subscriptions SET user_id = %(user)s, updated_at = now()
            WHERE stripe_customer_id = %(customer)s AND user_id IS NULL RETURNING id),
     i AS (UPDATE invoices SET user_id = %(user)s, updated_at = now()
            WHERE stripe_customer_id = %(customer)s AND user_id IS NULL RETURNING id)
SELECT 'payment', id, stripe_payment_intent_id, stripe_checkout_session_id FROM p
UNION ALL SELECT 'subscription', id, NULL, NULL FROM s
UNION ALL SELECT 'invoice', id, NULL, NULL FROM i
"""


async def map_customer(
    conn: AsyncConnection[Any], customer: str, user_id: str, ctx: Context, at: datetime
) -> bool:
    """Record customer -> user if the customer has no user yet, and link its unmapped rows.

    The caller holds the customer's exclusive lock. Returns whether anything changed. `user_id` is
    unique: if that user already has another customer, this one stays unmapped in the table, but
    its rows are still linked (the event said whose they are).
    """
    changed = False
    params = {"customer": customer, "user": user_id}
    if shared_transaction():
        # No savepoint: it would undo the other chains' work too. If another transaction maps this user
        # to another customer meanwhile, the unique violation fails the batch, which then applies each
        # event alone, with the savepoint below.
        changed = await (await conn.execute(_MAP, params)).fetchone() is not None
    else:
        try:
            async with conn.transaction():  # a concurrent mapping of this user to another customer may win
                changed = await (await conn.execute(_MAP, params)).fetchone() is not None
        except psycopg.errors.UniqueViolation:
            pass
    return await link_orphans(conn, customer, user_id, ctx, at) or changed


async def link_orphans(
    conn: AsyncConnection[Any], customer: str, user_id: str, ctx: Context, at: datetime
) -> bool:
    linked = await (await conn.execute(_LINK, {"customer": customer, "user": user_id})).fetchall()
    await follow_links(conn, linked, ctx, at, claim)
    return bool(linked)


Linked = tuple[str, str, str | None, str | None]  # kind, row id, PaymentIntent, Checkout Session


async def follow_links(
    conn: AsyncConnection[Any],
    linked: list[Linked],
    ctx: Context,
    at: datetime,
    claim_keys: Callable[[Iterable[str]], None],
) -> None:
    """Derive what the rows that just learned their user now grant (`_LINK`'s rows, of one customer)."""
    payments = [(row_id, intent, session) for kind, row_id, intent, session in linked if kind == "payment"]
    subs = [row_id for kind, row_id, _, _ in linked if kind == "subscription"]
    invoices = [row_id for kind, row_id, _, _ in linked if kind == "invoice"]
    # These rows change without their key locks (the customer's exclusive lock covers them against
    # other transactions); in a shared transaction no other chain may be working on them.
    claim_keys(f"pi:{intent}" for _, intent, _ in payments if intent)
    claim_keys(f"cs:{session}" for _, _, session in payments if session)
    claim_keys(f"sub:{sub_id}" for sub_id in subs)
    claim_keys(f"invoices:{invoice_id}" for invoice_id in invoices)
    for payment_id, _, _ in payments:
        snapshot = await payment_effects.snapshot(conn, payment_id)
        await payment_effects.settle(conn, payment_id, snapshot, ctx, at)
    for sub_id in subs:
        await subscriptions.derive(conn, sub_id, ctx, at)


_UPSERT: Final = """
INSERT INTO stripe_customers AS c (stripe_customer_id, user_id, email, name, deleted, event_created)
VALUES (%(id)s, %(user)s, %(email)s, %(name)s, %(deleted)s, %(created)s)
ON CONFLICT (stripe_customer_id) DO UPDATE
   SET email = EXCLUDED.email, name = EXCLUDED.name, deleted = EXCLUDED.deleted,
       event_created = EXCLUDED.event_created, updated_at = now()
 WHERE (EXCLUDED.deleted, EXCLUDED.event_created) > (c.deleted, COALESCE(c.event_created, -1))
RETURNING 1
"""


async def on_customer(conn: AsyncConnection[Any], event: Event, ctx: Context) -> Applied:
    customer = event.object(Customer)
    user_id = user_from_object(event.data.object)
    at = datetime.fromtimestamp(event.created, UTC)
    await lock_customer(conn, customer.id, exclusive=True)
    deleted = event.type == "customer.deleted" or event.data.object.get("deleted") is True
    cur = await conn.execute(
        _UPSERT,
        {
            "id": customer.id,
            "user": None,
            "email": customer.email,
            "name": customer.name,
            "deleted": deleted,
            "created": event.created,
        },
    )
    changed = await cur.fetchone() is not None
    if user_id:
        changed = await map_customer(conn, customer.id, user_id, ctx, at) or changed
    else:
        row = await (
            await conn.execute(
                "SELECT user_id::text FROM stripe_customers WHERE stripe_customer_id = %s", (customer.id,)
            )
        ).fetchone()
        user_id = row[0] if row else None
    return Applied("applied" if changed else "stale", user_id)


HANDLERS: Final[dict[str, Handler]] = {
    "customer.created": on_customer,
    "customer.updated": on_customer,
    "customer.deleted": on_customer,
}
