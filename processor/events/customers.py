"""customer.* events -> `stripe_customers`, and linking rows that arrived before their user was known.

A customer's user comes from `metadata.user_id` (set by paybus when it creates customers). Rows
written while the customer had no user keep `user_id` NULL ("unmapped", easy to find); when the
mapping appears — here, or from a Checkout Session naming both — every such payment, subscription and
invoice of the customer is linked and its entitlements derived. The newer customer event wins;
`deleted` is terminal; a user, once known, is never unlearned.
"""

from __future__ import annotations

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


_MAP: Final = """
INSERT INTO stripe_customers (stripe_customer_id, user_id) VALUES (%s, %s)
ON CONFLICT (stripe_customer_id)
DO UPDATE SET user_id = EXCLUDED.user_id, updated_at = now()
 WHERE stripe_customers.user_id IS NULL
RETURNING 1
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
    taken = await (
        await conn.execute(
            "SELECT 1 FROM stripe_customers WHERE user_id = %s AND stripe_customer_id <> %s",
            (user_id, customer),
        )
    ).fetchone()
    if taken is None and shared_transaction():
        # No savepoint: it would undo the other chains' work too. If another transaction maps this user
        # to another customer meanwhile, the unique violation fails the batch, which then applies each
        # event alone, with the savepoint below.
        changed = await (await conn.execute(_MAP, (customer, user_id))).fetchone() is not None
    elif taken is None:
        try:
            async with conn.transaction():  # a concurrent mapping of this user to another customer may win
                changed = await (await conn.execute(_MAP, (customer, user_id))).fetchone() is not None
        except psycopg.errors.UniqueViolation:
            pass
    return await link_orphans(conn, customer, user_id, ctx, at) or changed


async def link_orphans(
    conn: AsyncConnection[Any], customer: str, user_id: str, ctx: Context, at: datetime
) -> bool:
    rows = await (
        await conn.execute(
            "UPDATE payments SET user_id = %s, updated_at = now()"
            " WHERE stripe_customer_id = %s AND user_id IS NULL"
            " RETURNING id, stripe_payment_intent_id, stripe_checkout_session_id",
            (user_id, customer),
        )
    ).fetchall()
    # These rows change without their key locks (the customer's exclusive lock covers them against
    # other transactions); in a shared transaction no other chain may be working on them.
    claim(f"pi:{intent}" for _, intent, _ in rows if intent)
    claim(f"cs:{session}" for _, _, session in rows if session)
    for payment_id, _, _ in rows:
        snapshot = await payment_effects.snapshot(conn, str(payment_id))
        await payment_effects.settle(conn, str(payment_id), snapshot, ctx, at)
    subs = await (
        await conn.execute(
            "UPDATE subscriptions SET user_id = %s, updated_at = now()"
            " WHERE stripe_customer_id = %s AND user_id IS NULL RETURNING id",
            (user_id, customer),
        )
    ).fetchall()
    claim(f"sub:{sub_id}" for (sub_id,) in subs)
    for (sub_id,) in subs:
        await subscriptions.derive(conn, sub_id, ctx, at)
    invoices = await (
        await conn.execute(
            "UPDATE invoices SET user_id = %s, updated_at = now()"
            " WHERE stripe_customer_id = %s AND user_id IS NULL RETURNING id",
            (user_id, customer),
        )
    ).fetchall()
    claim(f"invoices:{invoice_id}" for (invoice_id,) in invoices)
    return bool(rows or subs or invoices)


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
