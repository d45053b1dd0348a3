"""What paybus knows about a user or a payment, read from Postgres for `paybus inspect` (read-only)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from processor.catalog import Catalog
from shared.ops.common import iso

if TYPE_CHECKING:
    import psycopg

TRAIL_LIMIT: Final = 200
Row = dict[str, Any]


def entitlement_status(row: Row, now: datetime) -> tuple[bool, str]:
    """Whether an entitlement row grants access now, and why in one sentence."""
    source = f"{row['source_type']} {row['source_id']}" + (
        f" ({row['product']})" if row.get("product") else ""
    )
    if not row["active"]:
        when = f" at {iso(row['revoked_at'])}" if row.get("revoked_at") else ""
        why = f": {row['reason']}" if row.get("reason") else ""
        return False, f"inactive: revoked{when}{why}; was granted by {source}"
    if row.get("expires_at") and row["expires_at"] <= now:
        return False, f"inactive: expired at {iso(row['expires_at'])}; was granted by {source}"
    until = f" until {iso(row['expires_at'])}" if row.get("expires_at") else " (no expiry)"
    return True, f"active{until}: granted {iso(row.get('granted_at'))} by {source}"


def _rows(conn: psycopg.Connection[Row], query: str, params: tuple[Any, ...]) -> list[Row]:
    return conn.execute(query, params).fetchall()


def user_report(
    conn: psycopg.Connection[Row], user_id: str, catalog: Catalog | None, feature: str | None, now: datetime
) -> dict[str, Any]:
    customers = _rows(
        conn,
        "SELECT stripe_customer_id, deleted, created_at FROM stripe_customers WHERE user_id = %s",
        (user_id,),
    )
    payments = _rows(conn, "SELECT * FROM payments WHERE user_id = %s ORDER BY created_at", (user_id,))
    subscriptions = _rows(
        conn, "SELECT * FROM subscriptions WHERE user_id = %s ORDER BY created_at", (user_id,)
    )
    invoices = _rows(conn, "SELECT * FROM invoices WHERE user_id = %s ORDER BY created_at", (user_id,))
    entitlements = _rows(
        conn, "SELECT * FROM entitlements WHERE user_id = %s ORDER BY feature, granted_at", (user_id,)
    )
    requests = _rows(
        conn,
        "SELECT idempotency_key, kind, status, stripe_object_id, created_at, response"
        " FROM payment_requests WHERE user_id = %s ORDER BY created_at",
        (user_id,),
    )
    objects = (
        [p["stripe_payment_intent_id"] for p in payments]
        + [p["stripe_checkout_session_id"] for p in payments]
        + [s["id"] for s in subscriptions]
        + [i["id"] for i in invoices]
        + [c["stripe_customer_id"] for c in customers]
    )
    trail = _trail(conn, "user_id = %s OR object_id = ANY(%s)", (user_id, [o for o in objects if o]))
    for row in entitlements:
        row["active_now"], row["why"] = entitlement_status(row, now)
    report: dict[str, Any] = {
        "user_id": user_id,
        "customers": customers,
        "payments": payments,
        "subscriptions": subscriptions,
        "invoices": invoices,
        "entitlements": entitlements,
        "payment_requests": requests,
        "event_trail": trail,
    }
    if feature:
        report["feature"] = _explain_feature(feature, entitlements, payments, subscriptions, catalog)
    report["_match"] = [user_id, *[o for o in objects if o]]
    return report


def _explain_feature(
    feature: str,
    entitlements: list[Row],
    payments: list[Row],
    subscriptions: list[Row],
    catalog: Catalog | None,
) -> dict[str, Any]:
    rows = [e for e in entitlements if e["feature"] == feature]
    if any(e["active_now"] for e in rows):
        return {"feature": feature, "has_access": True, "why": [e["why"] for e in rows if e["active_now"]]}
    why = [e["why"] for e in rows]
    granting = [p for p in (catalog.products.values() if catalog else ()) if feature in p.features]
    if not granting:
        why.append(f"no product in the catalog grants {feature!r}")
    for product in granting:
        mine = [p for p in payments if p.get("product") == product.key] + [
            s
            for s in subscriptions
            if s.get("product") == product.key or s.get("price_id") == product.price_id
        ]
        if not mine:
            why.append(
                f"{product.key} ({product.mode}) grants it; the user has no payment or subscription for it"
            )
        for obj in mine:
            ident = obj.get("stripe_payment_intent_id") or obj.get("id")
            why.append(f"{product.key}: {ident} is {obj['status']}")
    return {"feature": feature, "has_access": False, "why": why}


def _trail(conn: psycopg.Connection[Row], where: str, params: tuple[Any, ...]) -> list[Row]:
    return _rows(
        conn,
        f"SELECT id, type, created, outcome, object_id, received_at, processed_at FROM stripe_events"
        f" WHERE {where} ORDER BY created, received_at LIMIT {TRAIL_LIMIT}",
        params,
    )


def payment_report(conn: psycopg.Connection[Row], ident: str, now: datetime) -> dict[str, Any] | None:
    column = (
        "id::text"
        if is_uuid(ident)
        else ("stripe_checkout_session_id" if ident.startswith("cs_") else "stripe_payment_intent_id")
    )
    payment = conn.execute(f"SELECT * FROM payments WHERE {column} = %s", (ident,)).fetchone()
    if payment is None:
        return None
    intent, session = payment["stripe_payment_intent_id"], payment["stripe_checkout_session_id"]
    keys = [k for k in (intent, session, str(payment["id"])) if k]
    refunds = _rows(
        conn, "SELECT * FROM refunds WHERE stripe_payment_intent_id = %s ORDER BY created_at", (intent,)
    )
    disputes = _rows(conn, "SELECT * FROM disputes WHERE stripe_payment_intent_id = %s", (intent,))
    entitlements = _rows(conn, "SELECT * FROM entitlements WHERE source_id = ANY(%s)", (keys,))
    for row in entitlements:
        row["active_now"], row["why"] = entitlement_status(row, now)
    requests = _rows(
        conn,
        "SELECT idempotency_key, kind, status, stripe_object_id, created_at, response"
        " FROM payment_requests WHERE stripe_object_id = ANY(%s)",
        (keys,),
    )
    trail = _trail(conn, "object_id = ANY(%s)", ([k for k in (intent, session) if k],))
    return {
        "payment": payment,
        "refunds": refunds,
        "disputes": disputes,
        "entitlements": entitlements,
        "payment_requests": requests,
        "event_trail": trail,
        "_match": keys,
    }


def is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
