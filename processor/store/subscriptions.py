"""The `subscriptions` row: guarded writes, `subscription.updated`, and the entitlements it grants.

Status ranks for ties (DESIGN §9.2), each distinct so a tie resolves the same in any arrival order:
incomplete < trialing < active < past_due < unpaid < paused < canceled < incomplete_expired, with
canceled and incomplete_expired terminal. A newer event always wins over a non-terminal row, so
`past_due → active` (a recovered payment) and `paused → active` (resumed) apply normally.
Two same-second events with the same status are told apart by the later `current_period_end` (a
renewal); beyond that Stripe's order cannot be recovered from the events, the first applied stays,
and `paybus reconcile` is the repair.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from processor import entitlements
from processor.context import Context
from processor.ordering import key_of, stored_key
from processor.outbox import emit, new_id
from processor.store.locks import claim, lock_objects
from shared.domain_events import SubscriptionUpdated

STATUS_RANK: Final = {
    "incomplete": 0,
    "trialing": 1,
    "active": 2,
    "past_due": 3,
    "unpaid": 4,
    "paused": 5,
    "canceled": 6,
    "incomplete_expired": 7,
}
TERMINAL: Final = frozenset({"canceled", "incomplete_expired"})

# What subscribers of `subscription.updated` care about; a change elsewhere is not announced.
_ANNOUNCED: Final = (
    "status",
    "price_id",
    "product",
    "current_period_end",
    "cancel_at_period_end",
    "canceled_at",
    "trial_end",
    "user_id",
)


class SubscriptionUpdate(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: str
    created: int
    user_id: str | None
    stripe_customer_id: str | None
    price_id: str | None
    product: str | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    canceled_at: datetime | None
    ended_at: datetime | None
    trial_end: datetime | None
    metadata: dict[str, Any]


FIELDS: Final = (
    "status",
    "price_id",
    "product",
    "current_period_start",
    "current_period_end",
    "cancel_at_period_end",
    "canceled_at",
    "ended_at",
    "trial_end",
)


def new_row(upd: SubscriptionUpdate) -> dict[str, Any]:
    """The row ``upd`` makes when the subscription has none yet (metadata as a dict)."""
    return {
        **{field: getattr(upd, field) for field in FIELDS},
        "id": upd.id,
        "user_id": upd.user_id,
        "stripe_customer_id": upd.stripe_customer_id,
        "metadata": upd.metadata,
        "status_event_created": upd.created,
        "status_rank": key_of(upd.status, upd.created, STATUS_RANK, TERMINAL).rank,
    }


def changes_to(row: dict[str, Any], upd: SubscriptionUpdate) -> dict[str, Any]:
    """What ``upd`` changes in an existing row under the guard (metadata as a dict); empty if stale."""
    changes: dict[str, Any] = {}
    if row["user_id"] is None and upd.user_id is not None:
        changes["user_id"] = upd.user_id
    if row["stripe_customer_id"] is None and upd.stripe_customer_id is not None:
        changes["stripe_customer_id"] = upd.stripe_customer_id
    new_key = key_of(upd.status, upd.created, STATUS_RANK, TERMINAL)
    stored = stored_key(row["status"], row["status_event_created"], row["status_rank"], TERMINAL)
    if (new_key, _period(upd.current_period_end)) > (stored, _period(row["current_period_end"])):
        changes.update(
            {field: getattr(upd, field) for field in FIELDS},
            metadata=upd.metadata,
            status_event_created=upd.created,
            status_rank=new_key.rank,
        )
    return changes


def announcement(
    row: dict[str, Any] | None, after: dict[str, Any], subscription_id: str, at: datetime
) -> SubscriptionUpdated | None:
    """`subscription.updated` if what subscribers care about changed (or the row is new)."""
    if row is not None and all(row[f] == after[f] for f in _ANNOUNCED):
        return None
    return SubscriptionUpdated(
        id=new_id(),
        occurred_at=at,
        user_id=user_of(after),
        subscription_id=subscription_id,
        status=after["status"],
        previous_status=row["status"] if row else None,
        price_id=after["price_id"],
        product=after["product"],
        current_period_end=after["current_period_end"],
        cancel_at_period_end=after["cancel_at_period_end"],
        canceled_at=after["canceled_at"],
        trial_end=after["trial_end"],
    )


def grant_of(row: dict[str, Any], ctx: Context) -> entitlements.Grant:
    """What a subscription row grants now."""
    changed_at = row["updated_at"] if row["status_event_created"] is None else None
    return entitlements.for_subscription(
        entitlements.SubscriptionFacts(
            status=row["status"],
            product=row["product"],
            current_period_end=row["current_period_end"],
            status_changed_at=changed_at or _from_ts(row["status_event_created"]),
        ),
        ctx.catalog,
        ctx.grace,
    )


_INSERT: Final = """
INSERT INTO subscriptions (id, user_id, stripe_customer_id, status, price_id, product,
    current_period_start, current_period_end, cancel_at_period_end, canceled_at, ended_at, trial_end,
    metadata, status_event_created, status_rank)
VALUES (%(id)s, %(user_id)s, %(stripe_customer_id)s, %(status)s, %(price_id)s, %(product)s,
    %(current_period_start)s, %(current_period_end)s, %(cancel_at_period_end)s, %(canceled_at)s, %(ended_at)s,
    %(trial_end)s, %(metadata)s, %(status_event_created)s, %(status_rank)s)
RETURNING *
"""
# Invoices that arrived before their subscription learn its user with it.
LINK_INVOICES: Final = """
UPDATE invoices i SET user_id = v.user_id::uuid, updated_at = now()
  FROM unnest(%s::text[], %s::text[]) AS v(subscription_id, user_id)
 WHERE i.subscription_id = v.subscription_id AND i.user_id IS NULL
RETURNING i.subscription_id, i.id
"""


async def apply(
    conn: AsyncConnection[Any], upd: SubscriptionUpdate, ctx: Context, at: datetime
) -> tuple[bool, str | None]:
    """Apply ``upd`` under the guard, announce and derive; return (changed, the row's user)."""
    await lock_objects(conn, f"sub:{upd.id}")
    cur = conn.cursor(row_factory=dict_row)
    row = await (
        await cur.execute("SELECT * FROM subscriptions WHERE id = %s FOR UPDATE", (upd.id,))
    ).fetchone()
    if row is None:
        values = new_row(upd)
        after = await (await cur.execute(_INSERT, {**values, "metadata": Jsonb(upd.metadata)})).fetchone()
    else:
        changes = changes_to(row, upd)
        if not changes:
            return False, user_of(row)
        if "metadata" in changes:
            changes["metadata"] = Jsonb(changes["metadata"])
        columns = ", ".join(f"{name} = %({name})s" for name in changes)
        after = await (
            await cur.execute(
                f"UPDATE subscriptions SET {columns}, updated_at = now() WHERE id = %(id)s RETURNING *",
                {**changes, "id": upd.id},
            )
        ).fetchone()
    assert after is not None
    announced = announcement(row, after, upd.id, at)
    if announced is not None:
        await emit(conn, announced)
    if after["user_id"] is not None and (row is None or row["user_id"] is None):
        # Invoices that arrived before their subscription learn its user now, without their own key
        # locks: claim them, so that in a shared batch no other chain is working on them (`Claims`).
        linked = await (await conn.execute(LINK_INVOICES, ([upd.id], [str(after["user_id"])]))).fetchall()
        claim(f"invoices:{invoice_id}" for _, invoice_id in linked)
    # A subscription's entitlement rows are only ever written after its row (here or in `derive`), so a
    # new row has none to read.
    await _sync(conn, after, ctx, at, no_rows=row is None)
    return True, user_of(after)


async def derive(conn: AsyncConnection[Any], subscription_id: str, ctx: Context, at: datetime) -> None:
    """Re-derive the entitlements of one subscription from its row (after its user was linked)."""
    cur = conn.cursor(row_factory=dict_row)
    row = await (
        await cur.execute("SELECT * FROM subscriptions WHERE id = %s", (subscription_id,))
    ).fetchone()
    if row is not None:
        await _sync(conn, row, ctx, at)


async def _sync(
    conn: AsyncConnection[Any], row: dict[str, Any], ctx: Context, at: datetime, *, no_rows: bool = False
) -> None:
    await entitlements.sync(
        conn,
        source_type="subscription",
        source_id=row["id"],
        user_id=user_of(row),
        grant=grant_of(row, ctx),
        at=at,
        no_rows=no_rows,
    )


def _period(value: datetime | None) -> float:
    return value.timestamp() if value is not None else -1.0


def user_of(row: dict[str, Any]) -> str | None:
    return str(row["user_id"]) if row["user_id"] else None


def _from_ts(value: int) -> datetime:
    return datetime.fromtimestamp(value, UTC)
