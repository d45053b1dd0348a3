"""Which paybus user an event belongs to: metadata.user_id, client_reference_id, then the customer."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any, Final

from psycopg import AsyncConnection

# A UUID already in canonical form (lowercase, hyphenated), as paybus writes them: taken as it is.
_CANONICAL: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def as_uuid(value: object) -> str | None:
    """A canonical UUID string, or None for anything that is not one (never an error)."""
    if not isinstance(value, str):
        return None
    if _CANONICAL.fullmatch(value):  # every event's user is read twice: on arrival and by its handler
        return value
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
