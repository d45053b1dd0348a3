"""A batch's subscription events applied as a set: a few statements for all of them instead of ~8 each.

A chain of a batch (`processor.chains`) whose one new event is a customer.subscription.* event is taken
here: the locks of all such chains are taken, and their subscription rows, their customers' users and
their entitlement rows are read, each in one round trip; each event is applied to its row in memory by
the same rules as `subscriptions.on_subscription` (`store.subscriptions.changes_to`, `announcement`,
`grant_of`, `entitlements.plan_sync`); then the new rows, the changed rows, the invoices that learn
their user and the grants are written with one statement each. What each event produces (its outcome,
the rows, the entitlements, the outbox events) is what the per-event path produces.

A chain with more than one new event, or with other events, is left to the per-event path, and so is a
subscription row written before it had an event (`status_event_created` unset: its grant would read
`updated_at`, which only the database knows).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from processor import entitlements
from processor.chains import one_new_event
from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.events.subscriptions import on_subscription, subscription_update
from processor.outbox import emit
from processor.statements import send
from processor.store import subscriptions
from processor.store.locks import Claims, lock_chains
from processor.users import user_from_object

_ROWS: Final = "SELECT * FROM subscriptions WHERE id = ANY(%s) FOR UPDATE"
_ENTITLEMENTS: Final = """
SELECT source_id, id, user_id::text, feature, active, expires_at, product, reason FROM entitlements
 WHERE source_type = 'subscription' AND source_id = ANY(%s) ORDER BY id FOR UPDATE
"""
_USERS: Final = (
    "SELECT stripe_customer_id, user_id::text FROM stripe_customers WHERE stripe_customer_id = ANY(%s)"
)
_COLUMNS: Final = """unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
                %b::timestamptz[], %b::timestamptz[], %b::bool[], %b::timestamptz[], %b::timestamptz[],
                %b::timestamptz[], %b::text[], %b::int8[], %b::int8[])
       AS v(id, user_id, customer, status, price_id, product, period_start, period_end, cancel_at_period_end,
            canceled_at, ended_at, trial_end, metadata, created, rank)"""
_INSERT: Final = f"""
INSERT INTO subscriptions (id, user_id, stripe_customer_id, status, price_id, product, current_period_start,
                           current_period_end, cancel_at_period_end, canceled_at, ended_at, trial_end,
                           metadata, status_event_created, status_rank)
SELECT v.id, v.user_id::uuid, v.customer, v.status, v.price_id, v.product, v.period_start, v.period_end,
       v.cancel_at_period_end, v.canceled_at, v.ended_at, v.trial_end, v.metadata::jsonb, v.created, v.rank
  FROM {_COLUMNS}
"""
_UPDATE: Final = f"""
UPDATE subscriptions s
   SET user_id = v.user_id::uuid, stripe_customer_id = v.customer, status = v.status, price_id = v.price_id,
       product = v.product, current_period_start = v.period_start, current_period_end = v.period_end,
       cancel_at_period_end = v.cancel_at_period_end, canceled_at = v.canceled_at, ended_at = v.ended_at,
       trial_end = v.trial_end, metadata = v.metadata::jsonb, status_event_created = v.created,
       status_rank = v.rank, updated_at = now()
  FROM {_COLUMNS}
 WHERE s.id = v.id
"""


@dataclass
class _Chain:
    number: int  # its place in the batch's chains (the `Claims` of the batch know it by this)
    index: int  # its one new event's place in the batch
    update: subscriptions.SubscriptionUpdate
    row: dict[str, Any] | None = None  # the subscription row at the batch's start
    after: dict[str, Any] | None = None  # as the event leaves it (None: stale)


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
    """Apply the subscription chains of a batch (not those in ``skip``); return which chains it took and
    their events' results. Chains not taken are left, untouched, to the per-event path."""
    candidates = []
    for number, indexes in enumerate(chains):
        if number in skip:
            continue
        index = one_new_event(indexes, events, recorded, handlers, on_subscription)
        if index is not None:
            # the payload is checked before anything is locked or read, as on the per-event path
            candidates.append(_Chain(number, index, subscription_update(events[index], ctx, None)))
    if not candidates:
        return set(), {}
    await lock_chains(
        conn,
        claims,
        [
            (c.number, [cus] if (cus := c.update.stripe_customer_id) else [], [f"sub:{c.update.id}"])
            for c in candidates
        ],
    )
    ids = sorted({chain.update.id for chain in candidates})
    named = {chain.number: user_from_object(events[chain.index].data.object) for chain in candidates}
    unnamed = sorted(
        {
            c.update.stripe_customer_id
            for c in candidates
            if not named[c.number] and c.update.stripe_customer_id
        }
    )
    rows_cur = await conn.cursor(row_factory=dict_row).execute(_ROWS, (ids,))
    users_cur = await conn.cursor().execute(_USERS, (unnamed,)) if unnamed else None
    rows = {row["id"]: _plain(row) for row in await rows_cur.fetchall()}
    users = dict(await users_cur.fetchall()) if users_cur else {}
    existing = sorted(rows)
    held: dict[str, list[tuple[Any, ...]]] = {}
    if existing:
        for source_id, *row in await (await conn.execute(_ENTITLEMENTS, (existing,))).fetchall():
            held.setdefault(source_id, []).append(tuple(row))

    taken: list[_Chain] = []
    results: dict[int, Applied] = {}
    for chain in candidates:
        row = rows.get(chain.update.id)
        if row is not None and row["status_event_created"] is None:
            continue
        customer = chain.update.stripe_customer_id
        user = named[chain.number] or (users.get(customer) if customer else None)
        upd = msgspec.structs.replace(chain.update, user_id=user)
        chain.row = row
        if row is None:
            chain.after = subscriptions.new_row(upd)
        elif changes := subscriptions.changes_to(row, upd):
            chain.after = {**row, **changes}
        taken.append(chain)
        owner = chain.after if chain.after is not None else row
        assert owner is not None  # a stale event has a row
        user_of = subscriptions.user_of(owner) or user
        results[chain.index] = Applied("applied", user_of) if chain.after else Applied("stale", user_of)
    await _write(conn, events, taken, held, ctx, claims)
    return {chain.number for chain in taken}, results


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the set path keeps it in memory: the user as text, as an update carries it."""
    return {**row, "user_id": str(row["user_id"]) if row["user_id"] else None}


async def _write(
    conn: AsyncConnection[Any],
    events: list[Event],
    chains: list[_Chain],
    held: dict[str, list[tuple[Any, ...]]],
    ctx: Context,
    claims: Claims,
) -> None:
    applied = [chain for chain in chains if chain.after is not None]
    new = [chain.after for chain in applied if chain.row is None and chain.after is not None]
    changed = [chain.after for chain in applied if chain.row is not None and chain.after is not None]
    if new:
        await send(conn, _INSERT, _columns(new))
    if changed:
        await send(conn, _UPDATE, _columns(changed))
    linking = [
        (chain.number, chain.after)
        for chain in applied
        if chain.after is not None
        and chain.after["user_id"] is not None
        and (chain.row is None or chain.row["user_id"] is None)
    ]
    if linking:
        number_of = {after["id"]: number for number, after in linking}
        linked = await (
            await conn.execute(
                subscriptions.LINK_INVOICES,
                ([after["id"] for _, after in linking], [after["user_id"] for _, after in linking]),
            )
        ).fetchall()
        for subscription_id, invoice_id in linked:
            claims.claim(number_of[subscription_id], [f"invoices:{invoice_id}"])
    plans = []
    for chain in applied:
        after = chain.after
        assert after is not None
        at = datetime.fromtimestamp(events[chain.index].created, UTC)
        announced = subscriptions.announcement(chain.row, after, after["id"], at)
        if announced is not None:
            await emit(conn, announced)
        plans.append(
            entitlements.plan_sync(
                held.get(after["id"], []),
                source_type="subscription",
                source_id=after["id"],
                user_id=subscriptions.user_of(after),
                grant=subscriptions.grant_of(after, ctx),
                at=at,
            )
        )
    await entitlements.write_plans(conn, plans)


def _columns(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The rows as the arrays of `_COLUMNS`, in its order."""
    names = ("id", "user_id", "stripe_customer_id", *subscriptions.FIELDS)
    columns: list[list[Any]] = [[r[name] for r in rows] for name in names]
    columns.append([msgspec.json.encode(r["metadata"]).decode() for r in rows])
    columns.append([r["status_event_created"] for r in rows])
    columns.append([r["status_rank"] for r in rows])
    return columns
