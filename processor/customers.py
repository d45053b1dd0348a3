"""One Stripe customer per paybus user: found or created (also concurrently); email and name kept in sync.

Concurrent first requests of one user serialise on a transaction-scoped advisory lock keyed by the user,
so exactly one of them creates the customer; the others find its row once the lock is theirs. The
create call also carries an Idempotency-Key derived from the user, so a crash between Stripe's answer
and our COMMIT gets the same customer back on the next attempt instead of a second one.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Final

from psycopg import AsyncConnection

from processor.stripe_api import StripeApi

_LOCK_NAMESPACE: Final = 0x70617962  # "payb": keeps our advisory locks apart from anyone else's

_FIND: Final = (
    "SELECT stripe_customer_id, email, name FROM stripe_customers WHERE user_id = %s AND NOT deleted"
)
_INSERT: Final = """
INSERT INTO stripe_customers (stripe_customer_id, user_id, email, name)
VALUES (%s, %s, %s, %s)
ON CONFLICT (stripe_customer_id) DO UPDATE
   SET user_id = COALESCE(stripe_customers.user_id, EXCLUDED.user_id),
       email = COALESCE(EXCLUDED.email, stripe_customers.email),
       name = COALESCE(EXCLUDED.name, stripe_customers.name),
       updated_at = now()
"""
_UPDATE: Final = """
UPDATE stripe_customers SET email = COALESCE(%s, email), name = COALESCE(%s, name), updated_at = now()
 WHERE stripe_customer_id = %s
"""


def _lock_key(user_id: uuid.UUID) -> int:
    return int.from_bytes(hashlib.blake2b(user_id.bytes, digest_size=4).digest(), "big", signed=True)


async def find_customer(conn: AsyncConnection[Any], user_id: uuid.UUID) -> str | None:
    row = await (await conn.execute(_FIND, (user_id,))).fetchone()
    return str(row[0]) if row else None


async def ensure_customer(
    conn: AsyncConnection[Any],
    stripe: StripeApi,
    user_id: uuid.UUID,
    email: str | None = None,
    name: str | None = None,
) -> str:
    """The user's Stripe customer id, created at Stripe on first use. Commits its own transaction."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _lock_key(user_id)))
        row = await (await conn.execute(_FIND, (user_id,))).fetchone()
        if row is None:
            params: dict[str, Any] = {"metadata": {"user_id": str(user_id)}}
            if email:
                params["email"] = email
            if name:
                params["name"] = name
            # A user whose customer was deleted at Stripe gets a new one; the old row keeps its history.
            released = await conn.execute(
                "UPDATE stripe_customers SET user_id = NULL, updated_at = now()"
                " WHERE user_id = %s AND deleted",
                (user_id,),
            )
            generation = f":{released.rowcount}" if released.rowcount else ""
            customer = await stripe.create_customer(params, f"paybus:customer:{user_id}{generation}")
            await conn.execute(_INSERT, (customer["id"], user_id, email, name))
            return str(customer["id"])
        customer_id, known_email, known_name = str(row[0]), row[1], row[2]
        changes: dict[str, str] = {}
        if email and email != known_email:
            changes["email"] = email
        if name and name != known_name:
            changes["name"] = name
        if changes:
            digest = hashlib.sha256(repr(sorted(changes.items())).encode()).hexdigest()[:16]
            await stripe.update_customer(customer_id, changes, f"paybus:customer:{user_id}:{digest}")
            await conn.execute(_UPDATE, (changes.get("email"), changes.get("name"), customer_id))
        return customer_id
