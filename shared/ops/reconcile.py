"""`paybus reconcile --since 3d`: find events Stripe could not deliver and push the missing ones.

Reads Stripe's Events API (`GET /v1/events?delivery_success=false&created[gte]=…`, 100 per page,
`starting_after` pagination), looks each event up in the ledger and publishes the ones that are not
there to `stripe.events` with confirms — the same bytes path as a webhook, so the normal pipeline
applies them (and absorbs them if Stripe's own retry gets there too). Then, with what is left of
the budget, lists the window's PaymentIntents (`GET /v1/payment_intents`) and reports every settled
one (succeeded, canceled) whose `payments` row says otherwise or is missing: the drift report.

Request budget: at most `--max-requests` calls (default 50, i.e. 5,000 events) at most `--rate` per
second (default 4), far below Stripe's read limits (100/s live, 25/s test mode), so a reconcile never
starves the processor's own API calls. 429 and 5xx answers are retried a few times with back-off,
each try counted against the budget. Stripe keeps events for 30 days: older windows are refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from shared.amqp import EVENTS_EXCHANGE
from shared.config import Settings
from shared.envelope import H_ACCOUNT, H_EVENT_ID, H_LIVEMODE, H_RECEIVED_AT, NotAnEvent, decode_envelope
from shared.ops.common import UsageError, dump_json, fail, iso, parse_since, settings_or_exit, table
from shared.ops.stripe_lists import BudgetExhausted, StripeLists, intent_drift

H_RECONCILED_AT: Final = "x-paybus-reconciled-at"
RETENTION: Final = timedelta(days=30)


async def _push(url: str, events: list[tuple[dict[str, Any], bytes]], now: datetime) -> dict[str, str]:
    import aio_pika
    from pamqp.commands import Basic

    errors: dict[str, str] = {}
    connection = await aio_pika.connect(
        url, client_properties={"connection_name": "paybus-reconcile"}, timeout=10
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
        for event, body in events:
            headers: dict[str, Any] = {
                H_EVENT_ID: event["id"],
                H_LIVEMODE: bool(event.get("livemode")),
                H_RECEIVED_AT: iso(now),
                H_RECONCILED_AT: iso(now),
            }
            if event.get("account"):
                headers[H_ACCOUNT] = event["account"]
            message = aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                type=event["type"],
                headers=headers,
            )
            try:
                confirmation = await exchange.publish(
                    message, routing_key=event["type"], mandatory=True, timeout=10
                )
            except Exception as exc:
                errors[event["id"]] = f"publish failed ({type(exc).__name__})"
                continue
            if not isinstance(confirmation, Basic.Ack):
                errors[event["id"]] = "not routed to any queue"
    return errors


async def _run(args: argparse.Namespace) -> int:
    import aiohttp
    import psycopg

    settings = settings_or_exit("reconcile")
    now = datetime.now(UTC)
    try:
        since = parse_since(args.since, now)
    except UsageError as exc:
        return fail("reconcile", str(exc), 2)
    if since < now - RETENTION:
        return fail("reconcile", "Stripe keeps events for 30 days: choose --since 30d or less", 2)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        api = StripeLists(settings, session, args.max_requests, args.rate)
        try:
            listed = await api.undelivered(since)
        except BudgetExhausted:
            return fail(
                "reconcile",
                f"request budget of {args.max_requests} spent before the last page; "
                "narrow --since or raise --max-requests",
            )
        except RuntimeError as exc:
            return fail("reconcile", str(exc))
    usable: list[tuple[dict[str, Any], bytes]] = []
    skipped: list[dict[str, str]] = []
    for event in listed:
        body = json.dumps(event, separators=(",", ":")).encode()
        try:
            envelope = decode_envelope(body)
        except NotAnEvent as exc:
            skipped.append({"id": str(event.get("id")), "why": str(exc)[:100]})
            continue
        if envelope.livemode != settings.stripe_livemode:
            skipped.append({"id": envelope.id, "why": "other mode (livemode mismatch)"})
            continue
        usable.append((event, body))
    try:
        async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as conn:
            rows = await (
                await conn.execute(
                    "SELECT id, outcome FROM stripe_events WHERE id = ANY(%s)",
                    ([e["id"] for e, _ in usable],),
                )
            ).fetchall()
    except psycopg.Error as exc:
        return fail("reconcile", f"database error ({type(exc).__name__})")
    stored = {str(r[0]): r[1] for r in rows}
    missing = [(e, b) for e, b in usable if e["id"] not in stored]
    errors: dict[str, str] = {}
    if missing and not args.dry_run:
        try:
            errors = await _push(settings.amqp_url, missing, now)
        except Exception as exc:
            return fail("reconcile", f"cannot reach RabbitMQ ({type(exc).__name__}: {exc})")
    drift, checked, objects_complete = await _object_drift(settings, api, since)
    report = {
        "window": {"since": iso(since), "until": iso(now)},
        "requests": api.requests,
        "undelivered_listed": len(listed),
        "already_stored": {
            o or "pending": sum(1 for v in stored.values() if v == o) for o in set(stored.values())
        },
        "missing": [{"id": e["id"], "type": e["type"], "created": e.get("created")} for e, _ in missing],
        "pushed": [] if args.dry_run else [e["id"] for e, _ in missing if e["id"] not in errors],
        "errors": errors,
        "skipped": skipped,
        "dry_run": args.dry_run,
        "objects_checked": checked,
        "objects_complete": objects_complete,
        "object_drift": drift,
    }
    _print(args, report)
    return 1 if errors else 0


async def _object_drift(
    settings: Settings, api: StripeLists, since: datetime
) -> tuple[list[dict[str, Any]], int, bool]:
    """Compare settled PaymentIntents of the window with `payments`, within what is left of the budget."""
    import aiohttp
    import psycopg

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        api.use(session)
        try:
            intents = await api.payment_intents(since)
        except (BudgetExhausted, RuntimeError):
            return [], 0, False
    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as conn:
        rows = await (
            await conn.execute(
                "SELECT stripe_payment_intent_id, status FROM payments"
                " WHERE stripe_payment_intent_id = ANY(%s)",
                ([str(i.get("id")) for i in intents],),
            )
        ).fetchall()
    return intent_drift(intents, {str(r[0]): str(r[1]) for r in rows}), len(intents), True


def _print(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.json:
        print(dump_json(report))
        return
    print(
        f"window {report['window']['since']} .. {report['window']['until']}, "
        f"{report['requests']} Stripe API request(s)"
    )
    print(f"Stripe lists {report['undelivered_listed']} event(s) it could not deliver")
    stored = report["already_stored"]
    print(
        f"  already in the ledger: {sum(stored.values())}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(stored.items())) + ")" if stored else "")
    )
    print(f"  missing from the ledger: {len(report['missing'])}")
    if report["missing"]:
        print(
            table(
                [
                    (
                        iso(datetime.fromtimestamp(m["created"], UTC)) if m["created"] else "-",
                        m["id"],
                        m["type"],
                        report["errors"].get(m["id"]) or ("would push" if args.dry_run else "pushed"),
                    )
                    for m in report["missing"]
                ],
                ("CREATED", "EVENT ID", "TYPE", "ACTION"),
            )
        )
    for s in report["skipped"]:
        print(f"  skipped {s['id']}: {s['why']}")
    if stored.get("failed"):
        print("  failed events are in the dead letters: `paybus dlq list --reason ...` explains them")
    if not report["missing"]:
        print("no missing events: every undelivered event is already in the ledger")
    if not report["objects_complete"]:
        print("PaymentIntent check skipped or incomplete (request budget or Stripe error)")
    else:
        print(
            f"{report['objects_checked']} PaymentIntent(s) of the window compared with payments: "
            f"{len(report['object_drift'])} settled one(s) differ"
        )
        for d in report["object_drift"]:
            print(f"  {d['object']}: Stripe {d['stripe']}, paybus {d['paybus']}")
        if report["object_drift"] and report["pushed"]:
            print("  (events pushed just now may still be on their way; run again in a minute)")


def cmd_reconcile(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 25:
        raise argparse.ArgumentTypeError("must be above 0 and at most 25 requests per second")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "reconcile",
        help="push events Stripe could not deliver and print a drift report",
        description=(__doc__ or "").split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--since", required=True, help="window back from now: 30m, 12h, 3d (at most 30d) or an ISO time"
    )
    p.add_argument(
        "--max-requests", type=_positive_int, default=50, help="Stripe API request budget (default 50)"
    )
    p.add_argument(
        "--rate", type=_positive_float, default=4.0, help="requests per second at most (default 4)"
    )
    p.add_argument("--dry-run", action="store_true", help="report only; push nothing")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_reconcile)
