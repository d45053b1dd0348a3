"""`paybus inspect user UUID` / `paybus inspect payment ID`: everything paybus knows, for support staff.

Answers "why doesn't user U have feature F?": each entitlement says why it is or is not active, and
`--feature F` also explains a feature the user has no row for (which products grant it, and the
state of the user's payments and subscriptions for them). Read-only: the database is only queried
and the dead letters are peeked the way `paybus dlq list` does (held, then returned unchanged).
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from processor.catalog import Catalog, CatalogError, load_catalog
from shared.ops.common import dump_json, fail, iso, settings_or_exit, table
from shared.ops.dlq import DeadLetter, Scan

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


def _user_report(
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


def _payment_report(conn: psycopg.Connection[Row], ident: str, now: datetime) -> dict[str, Any] | None:
    column = (
        "id::text"
        if _is_uuid(ident)
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


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


async def _dead_letters(url: str, needles: list[str]) -> list[dict[str, Any]] | str:
    """Dead letters whose body mentions any of ``needles`` (peeked and returned), or why not known."""
    import aio_pika

    encoded = [n.encode() for n in needles if n]

    def select(letter: DeadLetter) -> bool:
        return any(n in letter.message.body for n in encoded)

    try:
        connection = await aio_pika.connect(
            url, client_properties={"connection_name": "paybus-inspect"}, timeout=5
        )
    except Exception as exc:
        return f"dead letters unknown: RabbitMQ unreachable ({type(exc).__name__})"
    try:
        async with connection:
            scan = Scan(await connection.channel())
            try:
                await scan.run(select, None)
            finally:
                await scan.settle()
    except Exception as exc:
        return f"dead letters unknown: {type(exc).__name__}"
    return [letter.summary() for letter in scan.selected]


def _print_user(report: dict[str, Any]) -> None:
    print(f"user {report['user_id']}")
    customers = ", ".join(
        c["stripe_customer_id"] + (" (deleted)" if c["deleted"] else "") for c in report["customers"]
    )
    print(f"stripe customers: {customers or 'none'}")
    if "feature" in report:
        f = report["feature"]
        print(f"\nfeature {f['feature']}: {'HAS ACCESS' if f['has_access'] else 'NO ACCESS'}")
        for line in f["why"]:
            print(f"  - {line}")
    _section(
        "entitlements",
        [(e["feature"], "yes" if e["active_now"] else "no", e["why"]) for e in report["entitlements"]],
        ("FEATURE", "ACTIVE", "WHY"),
    )
    _section(
        "payments",
        [
            (
                p["stripe_payment_intent_id"] or p["stripe_checkout_session_id"],
                p["status"],
                f"{p['amount']} {p['currency']}",
                p.get("product"),
                p["amount_refunded"] or None,
                p.get("last_error"),
                iso(p["updated_at"]),
            )
            for p in report["payments"]
        ],
        ("PAYMENT", "STATUS", "AMOUNT", "PRODUCT", "REFUNDED", "LAST ERROR", "UPDATED"),
    )
    _section(
        "subscriptions",
        [
            (
                s["id"],
                s["status"],
                s.get("product") or s.get("price_id"),
                iso(s.get("current_period_end")),
                s["cancel_at_period_end"],
            )
            for s in report["subscriptions"]
        ],
        ("SUBSCRIPTION", "STATUS", "PRODUCT", "PERIOD END", "CANCEL AT END"),
    )
    _section(
        "invoices",
        [
            (
                i["id"],
                i.get("status"),
                f"{i['amount_paid']}/{i['amount_due']} {i['currency']}",
                i.get("hosted_invoice_url"),
            )
            for i in report["invoices"]
        ],
        ("INVOICE", "STATUS", "PAID/DUE", "URL"),
    )
    _common(report)


def _print_payment(report: dict[str, Any]) -> None:
    p = report["payment"]
    print(
        f"payment {p['id']}  intent {p['stripe_payment_intent_id']}"
        f"  session {p['stripe_checkout_session_id']}"
    )
    print(
        f"user {p['user_id']}  status {p['status']}  amount {p['amount']} {p['currency']}  refunded "
        f"{p['amount_refunded']}  disputed {p['disputed']}  product {p['product']}"
        f"  last error {p['last_error']}"
    )
    _section(
        "refunds",
        [(r["id"], r["status"], r["amount"], r.get("reason")) for r in report["refunds"]],
        ("REFUND", "STATUS", "AMOUNT", "REASON"),
    )
    _section(
        "disputes",
        [(d["id"], d["status"], d["amount"], d.get("reason")) for d in report["disputes"]],
        ("DISPUTE", "STATUS", "AMOUNT", "REASON"),
    )
    _section(
        "entitlements",
        [(e["feature"], "yes" if e["active_now"] else "no", e["why"]) for e in report["entitlements"]],
        ("FEATURE", "ACTIVE", "WHY"),
    )
    _common(report)


def _common(report: dict[str, Any]) -> None:
    _section(
        "payment requests",
        [
            (r["idempotency_key"], r["kind"], r["status"], r.get("stripe_object_id"), iso(r["created_at"]))
            for r in report["payment_requests"]
        ],
        ("IDEMPOTENCY KEY", "KIND", "STATUS", "STRIPE OBJECT", "CREATED"),
    )
    _section(
        "event trail",
        [
            (iso(e["created"]), e["id"], e["type"], e["outcome"] or "pending", e["object_id"])
            for e in report["event_trail"]
        ],
        ("CREATED", "EVENT", "TYPE", "OUTCOME", "OBJECT"),
    )
    letters = report.get("dead_letters")
    if isinstance(letters, str):
        print(f"\ndead letters: {letters}")
    else:
        _section(
            "dead letters",
            [
                (d["event_id"], d["type"], d["reason"], d["attempts"], (d["error"] or "")[:60])
                for d in letters or []
            ],
            ("EVENT", "TYPE", "REASON", "ATTEMPTS", "ERROR"),
        )


def _section(title: str, rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> None:
    print(f"\n{title}: {len(rows) if rows else 'none'}")
    if rows:
        print(table(rows, header))


async def _run(args: argparse.Namespace) -> int:
    import psycopg
    from psycopg.rows import dict_row

    settings = settings_or_exit("inspect")
    now = datetime.now(UTC)
    if args.kind == "user" and not _is_uuid(args.ident):
        return fail("inspect", f"{args.ident!r} is not a user UUID", 2)
    catalog: Catalog | None
    try:
        catalog = load_catalog(settings.catalog_path)
    except CatalogError:
        catalog = None
    try:
        with psycopg.connect(settings.database_url, row_factory=dict_row, autocommit=True) as conn:
            if args.kind == "user":
                report = _user_report(conn, str(uuid.UUID(args.ident)), catalog, args.feature, now)
            else:
                found = _payment_report(conn, args.ident, now)
                if found is None:
                    return fail(
                        "inspect", f"no payment {args.ident!r} (give a payment UUID, pi_… or cs_…)", 1
                    )
                report = found
    except psycopg.Error as exc:
        return fail("inspect", f"database error ({type(exc).__name__}: {str(exc).strip()[:200]})")
    needles = report.pop("_match")
    report["dead_letters"] = (
        "not looked at (--no-dead-letters)"
        if args.no_dead_letters
        else (await _dead_letters(settings.amqp_url, needles))
    )
    if args.json:
        print(dump_json(report))
    elif args.kind == "user":
        _print_user(report)
    else:
        _print_payment(report)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="everything paybus knows about a user or a payment (read-only)",
        description=(__doc__ or "").split("\n\n", 1)[1] if __doc__ else None,
    )
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    user = kinds.add_parser("user", help="payments, subscriptions, invoices, entitlements, events of a user")
    user.add_argument("ident", metavar="UUID", help="the paybus user id")
    user.add_argument("--feature", help="explain why the user does or does not have this feature")
    payment = kinds.add_parser("payment", help="one payment: refunds, disputes, entitlements, events")
    payment.add_argument(
        "ident", metavar="ID", help="payment UUID, PaymentIntent id (pi_…) or Checkout Session (cs_…)"
    )
    for q in (user, payment):
        q.add_argument("--json", action="store_true", help="machine-readable output")
        q.add_argument(
            "--no-dead-letters", action="store_true", help="do not look into the dead-letter queue"
        )
        q.set_defaults(func=cmd_inspect)
    payment.set_defaults(feature=None)
