"""subscription.change: move one of the user's subscriptions to another catalog product (up or down)."""

from __future__ import annotations

from typing import Any, Final

from psycopg import AsyncConnection

from processor.requests.base import Deps, Done, KindHandler, Refused, product_for
from processor.requests.subscriptions import first_item, owned_product, result
from shared.messages import SubscriptionChange, success

KIND: Final = "subscription.change"


def validate(request: SubscriptionChange, deps: Deps) -> None:
    product_for(deps, request.product, "subscription")


async def handle(
    conn: AsyncConnection[Any], request: SubscriptionChange, deps: Deps, customer_id: str | None
) -> Done:
    await owned_product(conn, request.subscription_id, request.user_id)
    product = product_for(deps, request.product)
    current = await deps.stripe.retrieve_subscription(request.subscription_id)
    if current.get("status") in ("canceled", "incomplete_expired"):
        raise Refused("invalid_request", f"subscription {request.subscription_id} is {current.get('status')}")
    item = first_item(current)
    if item is None:
        raise Refused("invalid_request", f"subscription {request.subscription_id} has no items")
    price = item.get("price") or {}
    if isinstance(price, dict) and price.get("id") == product.price_id:
        raise Refused(
            "invalid_request", f"subscription {request.subscription_id} is already on {request.product}"
        )
    params: dict[str, Any] = {
        "items": [{"id": item["id"], "price": product.price_id}],
        "proration_behavior": request.proration_behavior,
        "metadata": {"user_id": str(request.user_id), "product": request.product},
    }
    subscription = await deps.stripe.update_subscription(
        request.subscription_id, params, f"paybus:{request.idempotency_key}:change"
    )
    return Done(success(result(subscription, request.product)), request.subscription_id)


HANDLER: Final = KindHandler(validate=validate, handle=handle)
