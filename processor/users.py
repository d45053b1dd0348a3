"""Which paybus user an event belongs to: metadata.user_id, client_reference_id, then the customer."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from psycopg import AsyncConnection


def as_uuid(value: object) -> str | None:
    """A canonical UUID string, or None for anything that is not one (never an error)."""
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def user_from_object(obj: Mapping[str, Any]) -> str | None:
    metadata = obj.get("metadata") or {}
    return as_uuid(metadata.get("user_id") if isinstance(metadata, Mapping) else None) or as_uuid(
        obj.get("client_reference_id")
    )


def customer_id(obj: Mapping[str, Any]) -> str | None:
    customer = obj.get("customer")
    if isinstance(customer, Mapping):  # expanded
        customer = customer.get("id")
    return customer if isinstance(customer, str) else None


async def resolve_user(conn: AsyncConnection[Any], obj: Mapping[str, Any]) -> str | None:
    user = user_from_object(obj)
    if user:
        return user
    customer = customer_id(obj)
    if not customer:
        return None
    row = await (
        await conn.execute("SELECT user_id FROM stripe_customers WHERE stripe_customer_id = %s", (customer,))
    ).fetchone()
    return str(row[0]) if row and row[0] else None
