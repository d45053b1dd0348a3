"""What every request kind gets (Stripe, catalog, settings) and gives back (a reply, the Stripe object id)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from psycopg import AsyncConnection

from processor.catalog import Catalog, Product
from processor.stripe_api import StripeApi
from shared.config import Settings
from shared.messages import MIN_AMOUNT, ErrorCode, InvalidRequest, Reply


class Deps(msgspec.Struct, frozen=True, kw_only=True):
    stripe: StripeApi
    catalog: Catalog
    settings: Settings


class Done(msgspec.Struct, frozen=True):
    """A definite answer: stored and returned for every repeat of the idempotency key."""

    reply: Reply
    stripe_object_id: str | None = None


class Refused(Exception):
    """A definite negative answer found while handling (not found, not refundable...); it is stored too."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


Validate = Callable[[Any, Deps], None]
Handle = Callable[[AsyncConnection[Any], Any, Deps, str | None], Awaitable[Done]]


class KindHandler(msgspec.Struct, frozen=True, kw_only=True):
    validate: Validate
    handle: Handle
    # Kinds that act for the user's Stripe customer get it found or created before the request runs.
    needs_customer: bool = False


def no_checks(request: Any, deps: Deps) -> None:
    return None


def product_for(deps: Deps, key: str, mode: str | None = None) -> Product:
    product = deps.catalog.by_key(key)
    if product is None:
        known = ", ".join(sorted(deps.catalog.products)) or "none"
        raise InvalidRequest(f"unknown product {key!r}; known products: {known}")
    if mode is not None and product.mode != mode:
        raise InvalidRequest(f"product {key!r} is a {product.mode} product, not {mode}")
    return product


def currency_for(deps: Deps, currency: str | None) -> str:
    value = (currency or deps.catalog.currency).lower()
    if value not in MIN_AMOUNT:
        raise InvalidRequest(f"unsupported currency {value!r}; supported: {', '.join(sorted(MIN_AMOUNT))}")
    return value


def check_amount(amount: int, currency: str) -> None:
    minimum = MIN_AMOUNT[currency]
    if amount < minimum:
        raise InvalidRequest(f"amount {amount} is below Stripe's minimum of {minimum} for {currency}")


def request_metadata(
    user_id: str, product: str | None, idempotency_key: str, extra: dict[str, str]
) -> dict[str, str]:
    """Metadata on every object paybus creates, so its webhooks map back to the user and product."""
    metadata = {**extra, "user_id": user_id, "paybus_request": idempotency_key}
    if product:
        metadata["product"] = product
    return metadata
