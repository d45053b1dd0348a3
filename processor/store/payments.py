"""The `payments` row of a PaymentIntent and/or Checkout Session: guarded writes, merging, derived state.

A payment may be announced by its PaymentIntent (payment_intent.*) or its Checkout Session
(checkout.session.*), in any order, so the row is found by either key. If two rows exist — one
created from a session that did not yet name its PaymentIntent, one from the PaymentIntent — the
first event naming both merges them into the PaymentIntent's row. Both keys are locked first
(`store.locks`), so concurrent writers never race into a unique violation.

Status ranks for ties (DESIGN §9.2): open < requires_action < processing < failed < canceled <
succeeded; succeeded and canceled are terminal. `failed` is not terminal: the PaymentIntent can be
retried and succeed, and that later event must win.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from processor.ordering import key_of, stored_key
from processor.statements import send
from processor.store.locks import lock_objects

STATUS_RANK: Final = {
    "open": 0,
    "requires_action": 1,
    "processing": 2,
    "failed": 3,
    "canceled": 4,
    "succeeded": 5,
}
TERMINAL: Final = frozenset({"succeeded", "canceled"})

# Learned once, never unlearned: filled in from any event (even a stale one) when still unknown.
_LEARNED: Final = ("user_id", "stripe_customer_id", "subscription_id", "product")


class PaymentUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """What one event says about a payment."""

    intent: str | None
    session: str | None
    status: str
    created: int
    mode: str | None = None  # None: the event does not know (PaymentIntents do not say)
    amount: int | None  # None: the event does not say (a session before its total is known)
    currency: str | None
    user_id: str | None = None
    stripe_customer_id: str | None = None
    subscription_id: str | None = None
    product: str | None = None
    error: str | None = None
    metadata: dict[str, Any] = {}


class Change(NamedTuple):
    """What `apply` did to the payment row."""

    changed: bool
    payment_id: str
    before: dict[str, Any] | None  # the row before the change; None for a new row
    # The row as written, when its refunded amount and dispute state need no deriving: the row existed
    # and kept its PaymentIntent (the one key they are derived by), or it is new and no charge, refund or
    # dispute of its PaymentIntent came first. `settle` then takes it as it is. None: derive them.
    current: dict[str, Any] | None = None


# The row(s) of a payment by whichever keys the event names. PaymentIntent events name one key, and
# a single-index lookup plans in half the time of the two-key OR (each execution is planned afresh).
_BY_KEYS: Final = {
    (True, False): "SELECT * FROM payments WHERE stripe_payment_intent_id = %(intent)s FOR UPDATE",
    (False, True): "SELECT * FROM payments WHERE stripe_checkout_session_id = %(session)s FOR UPDATE",
    (True, True): "SELECT * FROM payments"
    " WHERE stripe_payment_intent_id = %(intent)s OR stripe_checkout_session_id = %(session)s"
    " ORDER BY created_at FOR UPDATE",
    (False, False): "SELECT * FROM payments WHERE false",
}


def _key(row: dict[str, Any]) -> Any:
    return stored_key(row["status"], row["status_event_created"], row["status_rank"], TERMINAL)


async def apply(conn: AsyncConnection[Any], upd: PaymentUpdate) -> Change:
    """Apply ``upd`` under the guard; say what changed (`Change`)."""
    await lock_objects(conn, upd.intent and f"pi:{upd.intent}", upd.session and f"cs:{upd.session}")
    cur = conn.cursor(row_factory=dict_row)
    query = _BY_KEYS[upd.intent is not None, upd.session is not None]
    rows = await (await cur.execute(query, {"intent": upd.intent, "session": upd.session})).fetchall()
    if not rows:
        return await _insert(conn, upd)
    mergeable = len(rows) == 2 and all(r["stripe_payment_intent_id"] in (None, upd.intent) for r in rows)
    if mergeable:
        row, before = await _merge(conn, rows, upd.intent)
    else:  # one row, or (never seen in practice) two that name different PaymentIntents: keep the PI's
        row = next((r for r in rows if upd.intent and r["stripe_payment_intent_id"] == upd.intent), rows[0])
        before = dict(row)
    changes = changes_to(row, upd)
    if not changes:
        return Change(False, str(row["id"]), before)
    if "metadata" in changes:
        changes["metadata"] = Jsonb(changes["metadata"])
    if mergeable or "stripe_payment_intent_id" in changes:
        await _update(conn, row["id"], changes)
        return Change(True, str(row["id"]), before)
    return Change(True, str(row["id"]), before, await _update(conn, row["id"], changes, returning=True))


def changes_to(row: dict[str, Any], upd: PaymentUpdate) -> dict[str, Any]:
    """The columns ``upd`` changes in the payment ``row`` under the guard; empty if it changes nothing.

    Pure, so that a batch's PaymentIntent chains (`processor.events.intent_batch`) apply the same rule
    to rows held in memory. ``metadata`` comes back as a plain dict.
    """
    changes: dict[str, Any] = {}
    if upd.intent and row["stripe_payment_intent_id"] is None:
        changes["stripe_payment_intent_id"] = upd.intent
    if upd.session and row["stripe_checkout_session_id"] is None:
        changes["stripe_checkout_session_id"] = upd.session
    for field in _LEARNED:
        value = getattr(upd, field)
        if row[field] is None and value is not None:
            changes[field] = value
    at = datetime.fromtimestamp(upd.created, UTC)
    if upd.status == "succeeded" and (row["paid_at"] is None or at < row["paid_at"]):
        changes["paid_at"] = at  # the earliest success: the same whatever the delivery order
    new_key = key_of(upd.status, upd.created, STATUS_RANK, TERMINAL)
    if new_key > _key(row):
        if upd.amount is not None:
            changes.update(amount=upd.amount)
        if upd.currency is not None:
            changes.update(currency=upd.currency)
        changes.update(
            status=upd.status,
            last_error=upd.error,
            status_event_created=upd.created,
            status_rank=new_key.rank,
            metadata={**row["metadata"], **upd.metadata},
        )
        if upd.mode is not None:
            changes["mode"] = upd.mode
    elif upd.mode is not None and upd.session and row["mode"] != upd.mode:
        changes["mode"] = upd.mode  # only sessions know the mode; a stale one still says it
    return changes


def new_row(upd: PaymentUpdate) -> dict[str, Any]:
    """The columns of the payment row ``upd`` creates (`_insert`), all but its id and timestamps."""
    return {
        "user_id": upd.user_id,
        "stripe_payment_intent_id": upd.intent,
        "stripe_checkout_session_id": upd.session,
        "stripe_customer_id": upd.stripe_customer_id,
        "subscription_id": upd.subscription_id,
        "mode": upd.mode or "payment",
        "amount": upd.amount or 0,
        "currency": upd.currency or "inr",
        "status": upd.status,
        "product": upd.product,
        "last_error": upd.error,
        "metadata": upd.metadata,
        "status_event_created": upd.created,
        "status_rank": STATUS_RANK[upd.status],
        "paid_at": datetime.fromtimestamp(upd.created, UTC) if upd.status == "succeeded" else None,
        "amount_refunded": 0,
        "disputed": False,
        "dispute_status": None,
    }


async def _insert(conn: AsyncConnection[Any], upd: PaymentUpdate) -> Change:
    """Insert the row and read it back, with whether refunds or disputes wait for it (`Change.current`).

    Charges, refunds and disputes may arrive before their payment; only then does the new row need
    `settle` to fold them in. Without them, the row as inserted is already settled.
    """
    cur = conn.cursor(row_factory=dict_row)
    values = new_row(upd)
    row = await (
        await cur.execute(
            """
            INSERT INTO payments (user_id, stripe_payment_intent_id, stripe_checkout_session_id,
                                  stripe_customer_id, subscription_id, mode, amount, currency, status,
                                  product, last_error, metadata, status_event_created, status_rank, paid_at)
            VALUES (%(user_id)s, %(stripe_payment_intent_id)s, %(stripe_checkout_session_id)s,
                    %(stripe_customer_id)s, %(subscription_id)s, %(mode)s, %(amount)s, %(currency)s,
                    %(status)s, %(product)s, %(last_error)s, %(metadata)s, %(status_event_created)s,
                    %(status_rank)s, %(paid_at)s)
            RETURNING *,
                      EXISTS (SELECT FROM charges WHERE stripe_payment_intent_id = %(pi)s)
                      OR EXISTS (SELECT FROM refunds WHERE stripe_payment_intent_id = %(pi)s)
                      OR EXISTS (SELECT FROM disputes WHERE stripe_payment_intent_id = %(pi)s)
                      AS paybus_has_related
            """,
            {**values, "metadata": Jsonb(values["metadata"]), "pi": upd.intent},
        )
    ).fetchone()
    assert row is not None  # an INSERT without ON CONFLICT returns its row or raises
    related = row.pop("paybus_has_related")
    return Change(True, str(row["id"]), None, None if related else row)


async def _update(
    conn: AsyncConnection[Any], payment_id: Any, changes: dict[str, Any], *, returning: bool = False
) -> dict[str, Any] | None:
    """Write ``changes``; with ``returning``, wait for and return the row as updated."""
    columns = ", ".join(f"{name} = %({name})s" for name in changes)
    query = f"UPDATE payments SET {columns}, updated_at = now() WHERE id = %(id)s"
    params = {**changes, "id": payment_id}
    if not returning:
        await send(conn, query, params)
        return None
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(query + " RETURNING *", params)).fetchone()


async def _merge(
    conn: AsyncConnection[Any], rows: list[dict[str, Any]], intent: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fold the session's row into the PaymentIntent's row; return (kept row, folded 'before' state)."""
    keep = next(r for r in rows if r["stripe_payment_intent_id"] == intent)
    drop = next(r for r in rows if r is not keep)
    best = max((keep, drop), key=_key)
    merged = dict(keep)
    for field in ("status", "amount", "currency", "last_error", "status_event_created", "status_rank"):
        merged[field] = best[field]
    for field in _LEARNED:
        merged[field] = keep[field] if keep[field] is not None else drop[field]
    merged["stripe_checkout_session_id"] = drop["stripe_checkout_session_id"]
    merged["mode"] = drop["mode"]  # the session's row knows the mode
    merged["amount_refunded"] = max(keep["amount_refunded"], drop["amount_refunded"])
    paid = [r["paid_at"] for r in rows if r["paid_at"] is not None]
    merged["paid_at"] = min(paid) if paid else None
    merged["metadata"] = {**drop["metadata"], **keep["metadata"]}
    await conn.execute("DELETE FROM payments WHERE id = %s", (drop["id"],))
    # The dropped row's entitlements move to the kept row (then `payment_effects.settle` re-derives them).
    await conn.execute(
        "DELETE FROM entitlements d WHERE d.source_type = 'payment' AND d.source_id = %(drop)s AND EXISTS"
        " (SELECT 1 FROM entitlements k WHERE k.source_id = %(keep)s AND k.user_id = d.user_id"
        "  AND k.feature = d.feature)",
        {"drop": str(drop["id"]), "keep": str(keep["id"])},
    )
    await conn.execute(
        "UPDATE entitlements SET source_id = %s WHERE source_type = 'payment' AND source_id = %s",
        (str(keep["id"]), str(drop["id"])),
    )
    changes = {
        k: merged[k] for k in merged if k not in ("id", "created_at", "updated_at") and merged[k] != keep[k]
    }
    if "metadata" in changes:
        changes["metadata"] = Jsonb(changes["metadata"])
    if changes:
        await _update(conn, keep["id"], changes)
    return merged, dict(merged)
