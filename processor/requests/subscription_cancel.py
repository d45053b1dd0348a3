"""subscription.cancel: end one of the user's subscriptions now or at the end of the paid period."""

from __future__ import annotations

from typing import Any, Final

from psycopg import AsyncConnection

from processor.requests.base import Deps, Done, KindHandler, no_checks
from processor.requests.subscriptions import owned_product, result
from processor.stripe_api import StripeFailure
from shared.messages import SubscriptionCancel, success

KIND: Final = "subscription.cancel"


async def handle(
    conn: AsyncConnection[Any], request: SubscriptionCancel, deps: Deps, customer_id: str | None
) -> Done:
    product = await owned_product(conn, request.subscription_id, request.user_id)
    key = f"paybus:{request.idempotency_key}:cancel"
    if request.at_period_end:
        subscription = await deps.stripe.update_subscription(
            request.subscription_id, {"cancel_at_period_end": True}, key
        )
    else:
        try:
            subscription = await deps.stripe.cancel_subscription(request.subscription_id, key)
        except StripeFailure:
            # Cancelling is a DELETE, which Stripe does not replay by key: after a crash between Stripe's
            # answer and our COMMIT the second attempt fails, and the subscription is simply canceled.
            subscription = await deps.stripe.retrieve_subscription(request.subscription_id)
            if subscription.get("status") != "canceled":
                raise
    return Done(success(result(subscription, product)), request.subscription_id)


HANDLER: Final = KindHandler(validate=no_checks, handle=handle)
