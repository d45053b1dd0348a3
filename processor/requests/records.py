"""The local `payments` row created with the PaymentIntent or Checkout Session (status `open`).

Webhooks advance it afterwards. A webhook may even arrive before our COMMIT (Stripe sends them as soon
as the object exists), so the insert merges into a row the event handler already made and never
touches its status or ordering guard.
"""

from __future__ import annotations

from typing import Any, Final

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

_INSERT_INTENT: Final = """
INSERT INTO payments AS p (user_id, stripe_payment_intent_id, stripe_customer_id, mode, amount, currency,
                           status, product, metadata)
VALUES (%(user_id)s, %(object_id)s, %(customer)s, 'payment', %(amount)s, %(currency)s, %(status)s,
        %(product)s, %(metadata)s)
ON CONFLICT (stripe_payment_intent_id) DO UPDATE
   SET user_id = COALESCE(p.user_id, EXCLUDED.user_id),
       stripe_customer_id = COALESCE(p.stripe_customer_id, EXCLUDED.stripe_customer_id),
       product = COALESCE(p.product, EXCLUDED.product),
       metadata = EXCLUDED.metadata || p.metadata,
       updated_at = now()
RETURNING id
"""
_INSERT_SESSION: Final = """
INSERT INTO payments AS p (user_id, stripe_checkout_session_id, stripe_customer_id, mode, amount, currency,
                           status, product, metadata)
VALUES (%(user_id)s, %(object_id)s, %(customer)s, %(mode)s, %(amount)s, %(currency)s, 'open', %(product)s,
        %(metadata)s)
ON CONFLICT (stripe_checkout_session_id) DO UPDATE
   SET user_id = COALESCE(p.user_id, EXCLUDED.user_id),
       stripe_customer_id = COALESCE(p.stripe_customer_id, EXCLUDED.stripe_customer_id),
       product = COALESCE(p.product, EXCLUDED.product),
       metadata = EXCLUDED.metadata || p.metadata,
       updated_at = now()
RETURNING id
"""


async def record_intent(
    conn: AsyncConnection[Any],
    *,
    user_id: str,
    intent_id: str,
    customer: str | None,
    amount: int,
    currency: str,
    status: str,
    product: str | None,
    metadata: dict[str, str],
) -> str:
    params = {
        "user_id": user_id,
        "object_id": intent_id,
        "customer": customer,
        "amount": amount,
        "currency": currency,
        "status": status,
        "product": product,
        "metadata": Jsonb(metadata),
    }
    row = await (await conn.execute(_INSERT_INTENT, params)).fetchone()
    assert row is not None
    return str(row[0])


async def record_session(
    conn: AsyncConnection[Any],
    *,
    user_id: str,
    session_id: str,
    customer: str | None,
    mode: str,
    amount: int,
    currency: str,
    product: str | None,
    metadata: dict[str, str],
) -> str:
    params = {
        "user_id": user_id,
        "object_id": session_id,
        "customer": customer,
        "mode": mode,
        "amount": amount,
        "currency": currency,
        "product": product,
        "metadata": Jsonb(metadata),
    }
    row = await (await conn.execute(_INSERT_SESSION, params)).fetchone()
    assert row is not None
    return str(row[0])
