"""A batch's invoice events applied as a set: a few statements for all of them instead of ~5 each.

A chain of a batch (`processor.chains`) whose one new event is an invoice.* event is taken here: the
locks of all such chains are taken, and their invoice rows, their customers' users and their
subscriptions' users are read, each in one round trip; each event is applied to its row in memory by
the rule of `invoices.on_invoice` (`store.objects.decide`); then the new rows and the changed rows are
written with one statement each. What each event produces (its outcome, the row) is what the per-event
path produces. A chain with more than one new event, or with other events, is left to that path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from processor.chains import one_new_event
from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.events.invoices import invoice_snapshot, on_invoice, with_user
from processor.statements import send
from processor.store.locks import Claims, lock_chains
from processor.store.objects import Snapshot, decide
from processor.users import user_from_object

_ROWS: Final = "SELECT * FROM invoices WHERE id = ANY(%s) FOR UPDATE"
_USERS: Final = (
    "SELECT stripe_customer_id, user_id::text FROM stripe_customers WHERE stripe_customer_id = ANY(%s)"
)
_SUBSCRIPTION_USERS: Final = "SELECT id, user_id::text FROM subscriptions WHERE id = ANY(%s)"
# Every column an invoice event writes (`invoices.invoice_snapshot`), in the order of `_COLUMNS`.
_NAMES: Final = (
    "id",
    "subscription_id",
    "user_id",
    "stripe_customer_id",
    "stripe_payment_intent_id",
    "amount_due",
    "amount_paid",
    "currency",
    "number",
    "hosted_invoice_url",
    "invoice_pdf",
    "period_start",
    "period_end",
    "paid_at",
    "status",
    "status_event_created",
    "status_rank",
)
_COLUMNS: Final = """unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::int8[],
                %b::int8[], %b::text[], %b::text[], %b::text[], %b::text[], %b::timestamptz[],
                %b::timestamptz[], %b::timestamptz[], %b::text[], %b::int8[], %b::int8[])
       AS v(id, subscription_id, user_id, customer, payment_intent, amount_due, amount_paid, currency, number,
            hosted_invoice_url, invoice_pdf, period_start, period_end, paid_at, status, created, rank)"""
_INSERT: Final = f"""
INSERT INTO invoices (id, subscription_id, user_id, stripe_customer_id, stripe_payment_intent_id,
                      amount_due, amount_paid, currency, number, hosted_invoice_url, invoice_pdf,
                      period_start, period_end, paid_at, status, status_event_created, status_rank)
SELECT v.id, v.subscription_id, v.user_id::uuid, v.customer, v.payment_intent, v.amount_due, v.amount_paid,
       v.currency, v.number, v.hosted_invoice_url, v.invoice_pdf, v.period_start, v.period_end, v.paid_at,
       v.status, v.created, v.rank
  FROM {_COLUMNS}
"""
_UPDATE: Final = f"""
UPDATE invoices i
   SET subscription_id = v.subscription_id, user_id = v.user_id::uuid, stripe_customer_id = v.customer,
       stripe_payment_intent_id = v.payment_intent, amount_due = v.amount_due, amount_paid = v.amount_paid,
       currency = v.currency, number = v.number, hosted_invoice_url = v.hosted_invoice_url,
       invoice_pdf = v.invoice_pdf, period_start = v.period_start, period_end = v.period_end,
       paid_at = v.paid_at, status = v.status, status_event_created = v.created, status_rank = v.rank,
       updated_at = now()
  FROM {_COLUMNS}
 WHERE i.id = v.id
"""


@dataclass
class _Chain:
    number: int  # its place in the batch's chains (the `Claims` of the batch know it by this)
    index: int  # its one new event's place in the batch
    snapshot: Snapshot


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
    """Apply the invoice chains of a batch (not those in ``skip``); return which chains it took and their
    events' results. Chains not taken are left, untouched, to the per-event path."""
    candidates = []
    for number, indexes in enumerate(chains):
        index = None if number in skip else one_new_event(indexes, events, recorded, handlers, on_invoice)
        if index is not None:
            # the payload is checked before anything is locked or read, as on the per-event path
            candidates.append(_Chain(number, index, invoice_snapshot(events[index], ctx, None)))
    if not candidates:
        return set(), {}
    await lock_chains(
        conn,
        claims,
        [
            (
                c.number,
                [cus] if (cus := c.snapshot.learned["stripe_customer_id"]) else [],
                [f"invoices:{c.snapshot.object_id}"],
            )
            for c in candidates
        ],
    )
    ids = sorted({chain.snapshot.object_id for chain in candidates})
    named = {chain.number: user_from_object(events[chain.index].data.object) for chain in candidates}
    unnamed = sorted(
        {
            c
            for chain in candidates
            if not named[chain.number] and (c := chain.snapshot.learned["stripe_customer_id"])
        }
    )
    subs = sorted({s for chain in candidates if (s := chain.snapshot.learned["subscription_id"])})
    rows_cur = await conn.cursor(row_factory=dict_row).execute(_ROWS, (ids,))
    users_cur = await conn.cursor().execute(_USERS, (unnamed,)) if unnamed else None
    subs_cur = await conn.cursor().execute(_SUBSCRIPTION_USERS, (subs,)) if subs else None
    rows = {row["id"]: row for row in await rows_cur.fetchall()}
    users = dict(await users_cur.fetchall()) if users_cur else {}
    sub_users = dict(await subs_cur.fetchall()) if subs_cur else {}

    new_rows: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    results: dict[int, Applied] = {}
    for chain in candidates:
        learned = chain.snapshot.learned
        customer, subscription = learned["stripe_customer_id"], learned["subscription_id"]
        user = named[chain.number] or (users.get(customer) if customer else None)
        if user is None and subscription:
            user = sub_users.get(subscription)
        row = rows.get(chain.snapshot.object_id)
        values = decide(row, with_user(chain.snapshot, user))
        if row is None:
            after = values
            new_rows.append(after)
        elif values:
            after = {**row, **values}
            changed.append(after)
        else:
            after = row
        owner = str(after["user_id"]) if after["user_id"] else None
        results[chain.index] = Applied("applied" if row is None or values else "stale", owner)
    if new_rows:
        await send(conn, _INSERT, _columns(new_rows))
    if changed:
        await send(conn, _UPDATE, _columns(changed))
    return {chain.number for chain in candidates}, results


def _columns(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The rows as the arrays of `_COLUMNS`, in its order (users as text)."""
    columns = [[r[name] for r in rows] for name in _NAMES]
    columns[2] = [str(user) if user else None for user in columns[2]]
    return columns
