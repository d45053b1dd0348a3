"""customer.subscription.* events -> the `subscriptions` row and the entitlements it grants.

Every subscription event carries the whole subscription, so all six types are handled alike: the
snapshot's `status` is the state, guarded as in `processor.store.subscriptions`.

API versions from 2025-03-31 ("basil") moved `current_period_start/end` from the subscription onto
its items; the event's `api_version` says where to read them (with the other place as a fallback,
since a webhook endpoint pinned to an old version renders old shapes).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection

from processor.catalog import Catalog
from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.store import subscriptions
from processor.store.locks import lock_customer
from processor.users import customer_id, resolve_user

PERIODS_ON_ITEMS_SINCE: Final = "2025-03-31"


class Price(msgspec.Struct, frozen=True):
    id: str


class Item(msgspec.Struct, frozen=True):
    price: Price | None = None
    current_period_start: int | None = None
    current_period_end: int | None = None


class Items(msgspec.Struct, frozen=True):
    data: list[Item] = []


class Subscription(msgspec.Struct, frozen=True):
    id: str
    status: str
    items: Items = Items()
    metadata: dict[str, Any] = {}
    current_period_start: int | None = None
    current_period_end: int | None = None
    cancel_at_period_end: bool = False
    canceled_at: int | None = None
    ended_at: int | None = None
    trial_end: int | None = None


def periods_on_items(api_version: str | None) -> bool:
    return api_version is not None and api_version[:10] >= PERIODS_ON_ITEMS_SINCE


def period(sub: Subscription, api_version: str | None) -> tuple[int | None, int | None]:
    top = (sub.current_period_start, sub.current_period_end)
    item = sub.items.data[0] if sub.items.data else None
    on_item = (item.current_period_start, item.current_period_end) if item else (None, None)
    first, second = (on_item, top) if periods_on_items(api_version) else (top, on_item)
    return first if first[1] is not None else second


def product_key(catalog: Catalog, metadata: dict[str, Any], price_id: str | None) -> str | None:
    """The catalog key: `metadata.product` on objects paybus created, else the product of the price."""
    key = metadata.get("product")
    if isinstance(key, str) and catalog.by_key(key) is not None:
        return key
    product = catalog.by_price(price_id)
    if product is not None:
        return product.key
    return key if isinstance(key, str) and key else None


def _ts(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def subscription_update(event: Event, ctx: Context, user_id: str | None) -> subscriptions.SubscriptionUpdate:
    """What a customer.subscription.* event says of its subscription (``user_id`` resolved by the caller)."""
    sub = event.object(Subscription)
    price_id = next((item.price.id for item in sub.items.data if item.price is not None), None)
    start, end = period(sub, event.api_version)
    return subscriptions.SubscriptionUpdate(
        id=sub.id,
        status=sub.status,
        created=event.created,
        user_id=user_id,
        stripe_customer_id=customer_id(event.data.object),
        price_id=price_id,
        product=product_key(ctx.catalog, sub.metadata, price_id),
        current_period_start=_ts(start),
        current_period_end=_ts(end),
        cancel_at_period_end=sub.cancel_at_period_end,
        canceled_at=_ts(sub.canceled_at),
        ended_at=_ts(sub.ended_at),
        trial_end=_ts(sub.trial_end),
        metadata=sub.metadata,
    )


async def on_subscription(conn: AsyncConnection[Any], event: Event, ctx: Context) -> Applied:
    update = subscription_update(event, ctx, None)  # the payload is checked before anything is locked
    await lock_customer(conn, update.stripe_customer_id)
    user_id = await resolve_user(conn, event.data.object)
    changed, row_user = await subscriptions.apply(
        conn,
        msgspec.structs.replace(update, user_id=user_id),
        ctx,
        datetime.fromtimestamp(event.created, UTC),
    )
    return Applied("applied" if changed else "stale", row_user or user_id)


HANDLERS: Final[dict[str, Handler]] = {
    f"customer.subscription.{name}": on_subscription
    for name in ("created", "updated", "deleted", "paused", "resumed", "trial_will_end")
}
