"""A batch's customer events applied as a set: a few statements for all of them instead of ~4 each.

A chain of a batch (`processor.chains`) whose one new event is a customer.* event is taken here. The
customers of all such chains are locked exclusively in one statement, as `customers.on_customer` locks
each; then each of the per-event statements runs once for all of them, over arrays: the upsert of the
customer rows, the mapping of customers to the users their events name, the linking of those
customers' rows that had no user, and the reading of the users of customers whose events name none.
Rows that learn their user are then settled one by one (`customers.follow_links`), as on the per-event
path. What each event produces (its outcome, its user, the rows and what they grant) is what
`customers.on_customer` produces.

Two taken chains never share a customer or a user (they would be one chain), so no statement here
touches a row twice, and no row one of them writes is read by another.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from psycopg import AsyncConnection

from processor.chains import one_new_event
from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.events.customers import Customer, Linked, follow_links, on_customer
from processor.store.locks import Claims, lock_keys
from processor.users import user_from_object

# `customers._UPSERT`, over arrays.
_UPSERT: Final = """
INSERT INTO stripe_customers AS c (stripe_customer_id, user_id, email, name, deleted, event_created)
SELECT v.id, NULL, v.email, v.name, v.deleted, v.created
  FROM unnest(%b::text[], %b::text[], %b::text[], %b::bool[], %b::int8[])
       AS v(id, email, name, deleted, created)
ON CONFLICT (stripe_customer_id) DO UPDATE
   SET email = EXCLUDED.email, name = EXCLUDED.name, deleted = EXCLUDED.deleted,
       event_created = EXCLUDED.event_created, updated_at = now()
 WHERE (EXCLUDED.deleted, EXCLUDED.event_created) > (c.deleted, COALESCE(c.event_created, -1))
RETURNING stripe_customer_id
"""
# `customers._MAP`, over arrays.
_MAP: Final = """
INSERT INTO stripe_customers (stripe_customer_id, user_id)
SELECT v.customer, v.user_id::uuid
  FROM unnest(%b::text[], %b::text[]) AS v(customer, user_id)
 WHERE NOT EXISTS (SELECT 1 FROM stripe_customers
                    WHERE user_id = v.user_id::uuid AND stripe_customer_id <> v.customer)
ON CONFLICT (stripe_customer_id)
DO UPDATE SET user_id = EXCLUDED.user_id, updated_at = now()
 WHERE stripe_customers.user_id IS NULL
RETURNING stripe_customer_id
"""
# `customers._LINK`, over arrays: each linked row with the customer it belongs to.
_LINK: Final = """
WITH v AS (SELECT * FROM unnest(%b::text[], %b::text[]) AS v(customer, user_id)),
     p AS (UPDATE payments t SET user_id = v.user_id::uuid, updated_at = now() FROM v
            WHERE t.stripe_customer_id = v.customer AND t.user_id IS NULL
           RETURNING v.customer, t.id::text, t.stripe_payment_intent_id, t.stripe_checkout_session_id),
     s AS (UPDATE subscriptions t SET user_id = v.user_id::uuid, updated_at = now() FROM v
            WHERE t.stripe_customer_id = v.customer AND t.user_id IS NULL RETURNING v.customer, t.id),
     i AS (UPDATE invoices t SET user_id = v.user_id::uuid, updated_at = now() FROM v
            WHERE t.stripe_customer_id = v.customer AND t.user_id IS NULL RETURNING v.customer, t.id)
SELECT customer, 'payment', id, stripe_payment_intent_id, stripe_checkout_session_id FROM p
UNION ALL SELECT customer, 'subscription', id, NULL, NULL FROM s
UNION ALL SELECT customer, 'invoice', id, NULL, NULL FROM i
"""
_USERS: Final = (
    "SELECT stripe_customer_id, user_id::text FROM stripe_customers WHERE stripe_customer_id = ANY(%s)"
)


@dataclass
class _Chain:
    number: int  # its place in the batch's chains (the `Claims` of the batch know it by this)
    index: int  # its one new event's place in the batch
    customer: Customer
    user_id: str | None  # the user the event names
    deleted: bool


async def apply_chains(
    conn: AsyncConnection[Any],
    events: list[Event],
    recorded: list[bool],
    chains: list[list[int]],
    handlers: dict[str, Handler],
    ctx: Context,
    claims: Claims,
    skip: set[int],
) -> tuple[set[int], dict[int, Applied]]:
    """Apply the customer chains of a batch (not those in ``skip``); return which chains it took and
    their events' results. Chains not taken are left, untouched, to the per-event path."""
    taken: list[_Chain] = []
    for number, indexes in enumerate(chains):
        if number in skip:
            continue
        index = one_new_event(indexes, events, recorded, handlers, on_customer)
        if index is not None:
            event = events[index]
            # the payload is checked before anything is locked or read, as on the per-event path
            deleted = event.type == "customer.deleted" or event.data.object.get("deleted") is True
            customer = event.object(Customer)
            taken.append(_Chain(number, index, customer, user_from_object(event.data.object), deleted))
    if not taken:
        return set(), {}
    for chain in taken:
        claims.claim(chain.number, [f"cus:{chain.customer.id}"])
    await lock_keys(conn, sorted(f"cus:{chain.customer.id}" for chain in taken))

    upserted = await conn.execute(
        _UPSERT,
        [
            [c.customer.id for c in taken],
            [c.customer.email for c in taken],
            [c.customer.name for c in taken],
            [c.deleted for c in taken],
            [events[c.index].created for c in taken],
        ],
    )
    changed = {row[0] for row in await upserted.fetchall()}
    named = [c for c in taken if c.user_id]
    unnamed = [c.customer.id for c in taken if not c.user_id]
    if named:
        pairs = [[c.customer.id for c in named], [c.user_id for c in named]]
        mapped = await conn.execute(_MAP, pairs)
        changed.update(row[0] for row in await mapped.fetchall())
        linked: dict[str, list[Linked]] = {}
        for customer, kind, row_id, intent, session in await (await conn.execute(_LINK, pairs)).fetchall():
            linked.setdefault(customer, []).append((kind, row_id, intent, session))
        for chain in named:
            rows = linked.get(chain.customer.id)
            if rows:
                changed.add(chain.customer.id)
                at = datetime.fromtimestamp(events[chain.index].created, UTC)
                await follow_links(conn, rows, ctx, at, functools.partial(claims.claim, chain.number))
    users = dict(await (await conn.execute(_USERS, (unnamed,))).fetchall()) if unnamed else {}
    results = {
        c.index: Applied(
            "applied" if c.customer.id in changed else "stale", c.user_id or users.get(c.customer.id)
        )
        for c in taken
    }
    return {c.number for c in taken}, results
