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
from typing import Any

from processor.catalog import Catalog, CatalogError, load_catalog
from shared.ops.common import dump_json, fail, iso, settings_or_exit, table
from shared.ops.deadletters import DeadLetter, Scan
from shared.ops.lookup import is_uuid, payment_report, user_report


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
    if args.kind == "user" and not is_uuid(args.ident):
        return fail("inspect", f"{args.ident!r} is not a user UUID", 2)
    catalog: Catalog | None
    try:
        catalog = load_catalog(settings.catalog_path)
    except CatalogError:
        catalog = None
    try:
        with psycopg.connect(settings.database_url, row_factory=dict_row, autocommit=True) as conn:
            if args.kind == "user":
                report = user_report(conn, str(uuid.UUID(args.ident)), catalog, args.feature, now)
            else:
                found = payment_report(conn, args.ident, now)
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
