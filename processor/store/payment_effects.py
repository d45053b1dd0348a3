"""What a payment row implies: refunds and disputes folded in, payment events, its entitlements.

Called after any change to a payment or to its charges, refunds or disputes. Refunded amounts only
grow: the row keeps the greatest of what any charge snapshot said (`amount_refunded`) and the sum of
succeeded refunds, so an old snapshot cannot shrink it and a refund seen twice counts once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from processor import entitlements
from processor.context import Context
from processor.outbox import emit, new_id
from processor.store.locks import lock_objects
from shared.domain_events import DomainEvent, PaymentFailed, PaymentRefunded, PaymentSucceeded

# One statement: recompute the refunded amount and the dispute state from their own rows, store them.
# Every lookup is an index equality (a refund or dispute is found by its PaymentIntent, or by a charge of
# that PaymentIntent, in two arms of a UNION): written as one `OR` with a sub-select, Postgres can only
# scan the whole refunds and disputes tables, once per payment event.
_SETTLE: Final = """
WITH p AS (SELECT stripe_payment_intent_id AS pi, amount_refunded FROM payments WHERE id = %(id)s),
     ch AS (SELECT c.id, c.amount_refunded FROM charges c JOIN p ON c.stripe_payment_intent_id = p.pi),
     r AS (SELECT r.id, r.amount FROM refunds r JOIN p ON r.stripe_payment_intent_id = p.pi
            WHERE r.status = 'succeeded'
           UNION
           SELECT r.id, r.amount FROM refunds r JOIN ch ON r.stripe_charge_id = ch.id
            WHERE r.status = 'succeeded'),
     d AS (SELECT d.id, d.status FROM disputes d JOIN p ON d.stripe_payment_intent_id = p.pi
           UNION
           SELECT d.id, d.status FROM disputes d JOIN ch ON d.stripe_charge_id = ch.id),
     derived AS (
       SELECT GREATEST(p.amount_refunded,
                       COALESCE((SELECT max(amount_refunded) FROM ch), 0),
                       COALESCE((SELECT sum(amount) FROM r), 0)) AS amount_refunded,
              (SELECT CASE WHEN bool_or(status = 'lost') THEN 'lost'
                           WHEN bool_or(status NOT IN ('won', 'warning_closed')) THEN 'open'
                           WHEN count(*) > 0 THEN 'won' END FROM d) AS dispute_status
         FROM p)
UPDATE payments SET amount_refunded = derived.amount_refunded, dispute_status = derived.dispute_status,
                    disputed = derived.dispute_status IS NOT NULL, updated_at = now()
  FROM derived
 WHERE payments.id = %(id)s
RETURNING payments.*
"""


async def settle(
    conn: AsyncConnection[Any],
    payment_id: str,
    before: dict[str, Any] | None,
    ctx: Context,
    at: datetime,
    current: dict[str, Any] | None = None,
) -> bool:
    """Recompute refunds and disputes into the row, emit payment events, derive entitlements.

    ``before`` is the row before the caller's change (None for a new row); returns whether the
    refunded amount or dispute state changed. ``current`` is the row as the caller left it when the
    change cannot have moved refunds or disputes (`payments.Change.current`): the recomputation is
    skipped. Planned afresh each time (see `processor.service.plan_each_execution`), the statement
    above cost more Postgres time than everything else an event does.
    """
    if current is not None:
        row: dict[str, Any] | None = current
    else:
        cur = conn.cursor(row_factory=dict_row)
        row = await (await cur.execute(_SETTLE, {"id": payment_id})).fetchone()
    if row is None:
        return False
    old_refunded = before["amount_refunded"] if before else 0
    old_dispute = before["dispute_status"] if before else None
    changed = bool(row["amount_refunded"] != old_refunded or row["dispute_status"] != old_dispute)
    for domain_event in payment_events(row, before, at):
        await emit(conn, domain_event)
    grant = grant_of(row, ctx)
    user = str(row["user_id"]) if row["user_id"] else None
    # Only a succeeded payment grants, and succeeded is terminal (a merge keeps the better status): a
    # payment that was not succeeded before this change has no entitlement row to read.
    await entitlements.sync(
        conn,
        source_type="payment",
        source_id=payment_id,
        user_id=user,
        grant=grant,
        at=at,
        no_rows=before is None or before["status"] != "succeeded",
    )
    return changed


def grant_of(row: dict[str, Any], ctx: Context) -> entitlements.Grant:
    """What the payment ``row`` grants in its current state."""
    return entitlements.for_payment(
        entitlements.PaymentFacts(
            mode=row["mode"],
            status=row["status"],
            product=row["product"],
            amount=row["amount"],
            amount_refunded=row["amount_refunded"],
            dispute_status=row["dispute_status"],
            paid_at=row["paid_at"],
        ),
        ctx.catalog,
    )


def payment_events(row: dict[str, Any], before: dict[str, Any] | None, at: datetime) -> list[DomainEvent]:
    """The domain events for what changed between ``before`` and ``row``: succeeded, failed, refunded."""
    out: list[DomainEvent] = []
    user = str(row["user_id"]) if row["user_id"] else None
    status_changed = before is None or before["status"] != row["status"]
    if status_changed and row["status"] == "succeeded":
        out.append(
            PaymentSucceeded(
                id=new_id(),
                occurred_at=at,
                user_id=user,
                payment_id=str(row["id"]),
                stripe_payment_intent_id=row["stripe_payment_intent_id"],
                stripe_checkout_session_id=row["stripe_checkout_session_id"],
                mode=row["mode"],
                amount=row["amount"],
                currency=row["currency"],
                product=row["product"],
            ),
        )
    elif status_changed and row["status"] == "failed":
        out.append(
            PaymentFailed(
                id=new_id(),
                occurred_at=at,
                user_id=user,
                payment_id=str(row["id"]),
                stripe_payment_intent_id=row["stripe_payment_intent_id"],
                stripe_checkout_session_id=row["stripe_checkout_session_id"],
                amount=row["amount"],
                currency=row["currency"],
                product=row["product"],
                error=row["last_error"],
            ),
        )
    if row["amount_refunded"] > (before["amount_refunded"] if before else 0):
        out.append(
            PaymentRefunded(
                id=new_id(),
                occurred_at=at,
                user_id=user,
                payment_id=str(row["id"]),
                stripe_payment_intent_id=row["stripe_payment_intent_id"],
                amount=row["amount"],
                amount_refunded=row["amount_refunded"],
                currency=row["currency"],
                fully_refunded=row["amount"] > 0 and row["amount_refunded"] >= row["amount"],
            ),
        )
    return out


async def ids_for_intent(conn: AsyncConnection[Any], intent: str | None) -> list[str]:
    """The payment row of a PaymentIntent (locking its key first), as a list of zero or one id."""
    if not intent:
        return []
    await lock_objects(conn, f"pi:{intent}")
    rows = await (
        await conn.execute(
            "SELECT id FROM payments WHERE stripe_payment_intent_id = %s FOR UPDATE", (intent,)
        )
    ).fetchall()
    return [str(r[0]) for r in rows]


async def snapshot(conn: AsyncConnection[Any], payment_id: str) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute("SELECT * FROM payments WHERE id = %s", (payment_id,))).fetchone()
