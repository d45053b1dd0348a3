"""payment_intent.create: a PaymentIntent whose client_secret (and our publishable key) the frontend uses."""

from __future__ import annotations

from typing import Any, Final

from psycopg import AsyncConnection

from processor.requests.base import (
    Deps,
    Done,
    KindHandler,
    check_amount,
    currency_for,
    product_for,
    request_metadata,
)
from processor.requests.records import record_intent
from shared.messages import InvalidRequest, NextAction, PaymentIntentCreate, PaymentIntentResult, success

KIND: Final = "payment_intent.create"

# Stripe's PaymentIntent statuses -> the local payments status until webhooks say more.
LOCAL_STATUS: Final = {"requires_action": "requires_action", "processing": "processing"}


def validate(request: PaymentIntentCreate, deps: Deps) -> None:
    if request.product is not None:
        product_for(deps, request.product, "payment")
    check_amount(request.amount, currency_for(deps, request.currency))
    if request.confirm and request.payment_method is None:
        raise InvalidRequest("confirm needs a payment_method")


def next_action(intent: dict[str, Any]) -> NextAction | None:
    action = intent.get("next_action")
    if not isinstance(action, dict) or not action.get("type"):
        return None
    redirect = action.get("redirect_to_url")
    url = redirect.get("url") if isinstance(redirect, dict) else None
    return NextAction(type=str(action["type"]), redirect_url=url)


async def handle(
    conn: AsyncConnection[Any], request: PaymentIntentCreate, deps: Deps, customer_id: str | None
) -> Done:
    user = str(request.user_id)
    currency = currency_for(deps, request.currency)
    metadata = request_metadata(user, request.product, request.idempotency_key, request.metadata)
    params: dict[str, Any] = {
        "amount": request.amount,
        "currency": currency,
        "customer": customer_id,
        "metadata": metadata,
    }
    if request.payment_method is not None:
        params["payment_method"] = request.payment_method
    if request.confirm:
        params["confirm"] = True
    intent = await deps.stripe.create_payment_intent(
        params, f"paybus:{request.idempotency_key}:payment_intent"
    )
    status = str(intent.get("status") or "requires_payment_method")
    payment_id = await record_intent(
        conn,
        user_id=user,
        intent_id=intent["id"],
        customer=customer_id,
        amount=request.amount,
        currency=currency,
        status=LOCAL_STATUS.get(status, "open"),
        product=request.product,
        metadata=metadata,
    )
    result = PaymentIntentResult(
        payment_intent_id=intent["id"],
        client_secret=str(intent["client_secret"]),
        publishable_key=deps.settings.stripe_publishable_key,
        status=status,
        payment_id=payment_id,
        amount=request.amount,
        currency=currency,
        next_action=next_action(intent),
    )
    return Done(success(result), intent["id"])


HANDLER: Final = KindHandler(validate=validate, handle=handle, needs_customer=True)
