"""checkout_session.create: a Stripe Checkout Session for a catalog product or a dynamic one-time amount."""

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
from processor.requests.records import record_session
from shared.messages import CheckoutSessionCreate, CheckoutSessionResult, InvalidRequest, success

KIND: Final = "checkout_session.create"


def validate(request: CheckoutSessionCreate, deps: Deps) -> None:
    if request.product is not None and request.amount is not None:
        raise InvalidRequest("give either a catalog product or an amount, not both")
    if request.product is None and request.amount is None:
        raise InvalidRequest("missing product: give a catalog product key or an amount with a currency")
    if request.product is not None:
        product_for(deps, request.product, request.mode)
        if request.currency is not None:
            raise InvalidRequest("currency comes from the product's price; omit it with a product")
        return
    if request.mode == "subscription":
        raise InvalidRequest("a subscription checkout needs a catalog product")
    assert request.amount is not None
    check_amount(request.amount, currency_for(deps, request.currency))


async def handle(
    conn: AsyncConnection[Any], request: CheckoutSessionCreate, deps: Deps, customer_id: str | None
) -> Done:
    user = str(request.user_id)
    if request.product is not None:
        product = product_for(deps, request.product)
        mode, currency = product.mode, deps.catalog.currency
        line_item: dict[str, Any] = {"price": product.price_id, "quantity": request.quantity}
    else:
        assert request.amount is not None
        mode, currency = "payment", currency_for(deps, request.currency)
        line_item = {
            "price_data": {
                "currency": currency,
                "unit_amount": request.amount,
                "product_data": {"name": request.description or "Payment"},
            },
            "quantity": request.quantity,
        }
    metadata = request_metadata(user, request.product, request.idempotency_key, request.metadata)
    params: dict[str, Any] = {
        "mode": mode,
        "line_items": [line_item],
        "customer": customer_id,
        "client_reference_id": user,
        "metadata": metadata,
        "success_url": request.success_url or deps.settings.checkout_success_url,
        "cancel_url": request.cancel_url or deps.settings.checkout_cancel_url,
    }
    # The PaymentIntent or Subscription the session creates carries the same metadata, so their own
    # webhooks map back to the user and product without the session.
    params["payment_intent_data" if mode == "payment" else "subscription_data"] = {"metadata": metadata}
    session = await deps.stripe.create_checkout_session(params, f"paybus:{request.idempotency_key}:checkout")
    amount = session.get("amount_total")
    currency = str(session.get("currency") or currency)
    payment_id = await record_session(
        conn,
        user_id=user,
        session_id=session["id"],
        customer=customer_id,
        mode=mode,
        amount=int(amount or 0),
        currency=currency,
        product=request.product,
        metadata=metadata,
    )
    result = CheckoutSessionResult(
        session_id=session["id"],
        url=str(session["url"]),
        payment_id=payment_id,
        mode=mode,
        amount=int(amount) if amount is not None else None,
        currency=currency,
        expires_at=session.get("expires_at"),
    )
    return Done(success(result), session["id"])


HANDLER: Final = KindHandler(validate=validate, handle=handle, needs_customer=True)
