"""What subscription.cancel and .change share: the ownership check, the reply from Stripe's object."""

from __future__ import annotations

from typing import Any, Final

from psycopg import AsyncConnection

from processor.requests.base import Refused
from shared.messages import SubscriptionResult

_OWNED: Final = "SELECT product FROM subscriptions WHERE id = %s AND user_id = %s"


async def owned_product(conn: AsyncConnection[Any], subscription_id: str, user_id: object) -> str | None:
    """The subscription's catalog product; Refused(not_found) unless it is this user's subscription."""
    row = await (await conn.execute(_OWNED, (subscription_id, user_id))).fetchone()
    if row is None:
        raise Refused("not_found", f"no subscription {subscription_id} of this user")
    return str(row[0]) if row[0] else None


def first_item(subscription: dict[str, Any]) -> dict[str, Any] | None:
    items = (subscription.get("items") or {}).get("data") or []
    return items[0] if items and isinstance(items[0], dict) else None


def result(subscription: dict[str, Any], product: str | None) -> SubscriptionResult:
    item = first_item(subscription) or {}
    price = item.get("price") or item.get("plan") or {}
    # Newer API versions moved the period onto the subscription items.
    period_end = subscription.get("current_period_end") or item.get("current_period_end")
    return SubscriptionResult(
        subscription_id=str(subscription["id"]),
        status=str(subscription.get("status")),
        cancel_at_period_end=bool(subscription.get("cancel_at_period_end")),
        product=product,
        price_id=price.get("id") if isinstance(price, dict) else None,
        current_period_end=int(period_end) if period_end else None,
        canceled_at=subscription.get("canceled_at"),
    )
