"""refund.create: refund (part of) one of the user's own succeeded payments, never more than is refundable.

The payment row is locked for the call, so two refunds of one payment (under different keys) are
checked against the refundable amount one after the other, not both against the same stale figure.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final

from psycopg import AsyncConnection

from processor.context import Context
from processor.requests.base import Deps, Done, KindHandler, Refused
from processor.store import payment_effects
from shared.messages import InvalidRequest, RefundCreate, RefundResult, success

KIND: Final = "refund.create"

_PAYMENT: Final = """
SELECT id, stripe_payment_intent_id, amount, amount_refunded, currency, status FROM payments
 WHERE (id = %s OR stripe_payment_intent_id = %s) AND user_id = %s
 FOR UPDATE
"""
_RECORD: Final = """
INSERT INTO refunds (id, stripe_payment_intent_id, amount, currency, status, reason)
VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING
"""
_PENDING: Final = """
SELECT COALESCE(sum(amount), 0) FROM refunds WHERE stripe_payment_intent_id = %s AND status = 'pending'
"""


def validate(request: RefundCreate, deps: Deps) -> None:
    if (request.payment_id is None) == (request.payment_intent_id is None):
        raise InvalidRequest("give exactly one of payment_id or payment_intent_id")


async def handle(
    conn: AsyncConnection[Any], request: RefundCreate, deps: Deps, customer_id: str | None
) -> Done:
    wanted = str(request.payment_id or request.payment_intent_id)
    row = await (
        await conn.execute(_PAYMENT, (request.payment_id, request.payment_intent_id, request.user_id))
    ).fetchone()
    if row is None:
        raise Refused("not_found", f"no payment {wanted} of this user")
    payment_id, intent_id, amount, refunded, currency, status = row
    if intent_id is None:
        raise Refused("invalid_request", f"payment {wanted} has no PaymentIntent yet")
    if status != "succeeded":
        raise Refused(
            "invalid_request", f"payment {wanted} is {status}; only succeeded payments can be refunded"
        )
    # pending refunds are not in amount_refunded yet, but they are spoken for
    pending_row = await (await conn.execute(_PENDING, (intent_id,))).fetchone()
    refundable = int(amount) - int(refunded) - int(pending_row[0] if pending_row else 0)
    if refundable <= 0:
        raise Refused("invalid_request", f"payment {wanted} is already fully refunded")
    value = request.amount if request.amount is not None else refundable
    if value > refundable:
        raise Refused(
            "invalid_request", f"refund amount {value} exceeds the refundable {refundable} {currency}"
        )
    params: dict[str, Any] = {
        "payment_intent": intent_id,
        "amount": value,
        "metadata": {"user_id": str(request.user_id), "paybus_request": request.idempotency_key},
    }
    if request.reason is not None:
        params["reason"] = request.reason
    refund = await deps.stripe.create_refund(params, f"paybus:{request.idempotency_key}:refund")
    refund_status = str(refund.get("status") or "pending")
    before = await payment_effects.snapshot(conn, str(payment_id))
    await conn.execute(_RECORD, (refund["id"], intent_id, value, currency, refund_status, request.reason))
    # The same fold the refund webhooks use: refunded amount, payment.refunded, and a full refund
    # revoking what the payment granted, all in this transaction.
    ctx = Context(catalog=deps.catalog, grace=timedelta(days=deps.settings.grace_days))
    await payment_effects.settle(conn, str(payment_id), before, ctx, datetime.now(UTC))
    after = await payment_effects.snapshot(conn, str(payment_id))
    total = int(after["amount_refunded"]) if after else int(refunded)
    result = RefundResult(
        refund_id=refund["id"],
        status=refund_status,
        amount=value,
        currency=str(currency),
        payment_id=str(payment_id),
        payment_intent_id=intent_id,
        amount_refunded=total,
    )
    return Done(success(result), refund["id"])


HANDLER: Final = KindHandler(validate=validate, handle=handle)
