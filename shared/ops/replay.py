"""`paybus replay`: republish stored raw events from the ledger (`stripe_events.payload`) to `stripe.events`.

A replayed event goes through the normal pipeline. An event the ledger already settled (`applied`,
`ignored`, `stale`) is a duplicate there and changes nothing; a `failed` one is applied again.

`--force` is for after a bug fix: it marks each selected ledger row (`reapply_requested_at`) and then
republishes, and the one delivery that finds the mark re-runs the event's handler and clears the mark
in the same transaction (redeliveries of the replayed message stay duplicates). The re-run goes
through the same ordering guards as any event, so it can only add what the guards allow — a missing
link to a user, an entitlement, a row an old version did not write, an event type that had no handler
when it arrived (`ignored` becomes `applied`) — and never rolls back state that a newer event set.
An `applied` outcome is never downgraded by a re-run that finds nothing left to do.
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from typing import Any, Final

from shared.amqp import EVENTS_EXCHANGE
from shared.envelope import H_ACCOUNT, H_EVENT_ID, H_LIVEMODE, H_RECEIVED_AT
from shared.ops.common import UsageError, dump_json, fail, iso, parse_since, settings_or_exit, table

H_REPLAYED_AT: Final = "x-paybus-replayed-at"
IN_FLIGHT: Final = 64

_SELECT: Final = """
SELECT id, type, livemode, account, payload::text, outcome, received_at, created
  FROM stripe_events
 WHERE (%(ids)s::text[] IS NULL OR id = ANY(%(ids)s))
   AND (%(type)s::text IS NULL OR type LIKE %(type)s)
   AND (%(since)s::timestamptz IS NULL OR created >= %(since)s)
 ORDER BY created, id
 LIMIT %(limit)s
"""
_MARK: Final = "UPDATE stripe_events SET reapply_requested_at = now() WHERE id = ANY(%s)"


def _like(pattern: str) -> str:
    """`payment_intent.*` → `payment_intent.%` (and `_` literal)."""
    return pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%")


async def _publish_all(url: str, rows: list[tuple[Any, ...]], now: datetime) -> dict[str, str]:
    """Publish each row with a confirm, a few at a time; return the errors by event id."""
    import aio_pika
    from pamqp.commands import Basic

    errors: dict[str, str] = {}
    connection = await aio_pika.connect(
        url, client_properties={"connection_name": "paybus-replay"}, timeout=10
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def publish(row: tuple[Any, ...]) -> None:
            event_id, event_type, livemode, account, payload, _, received_at, _ = row
            headers: dict[str, Any] = {
                H_EVENT_ID: event_id,
                H_LIVEMODE: livemode,
                H_RECEIVED_AT: iso(received_at),
                H_REPLAYED_AT: iso(now),
            }
            if account:
                headers[H_ACCOUNT] = account
            message = aio_pika.Message(
                payload.encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                type=event_type,
                headers=headers,
            )
            async with limit:
                try:
                    confirmation = await exchange.publish(
                        message, routing_key=event_type, mandatory=True, timeout=10
                    )
                except Exception as exc:
                    errors[event_id] = f"publish failed ({type(exc).__name__})"
                    return
            if not isinstance(confirmation, Basic.Ack):
                errors[event_id] = "not routed to any queue"

        await asyncio.gather(*(publish(row) for row in rows))
    return errors


async def _run(args: argparse.Namespace) -> int:
    import psycopg

    settings = settings_or_exit("replay")
    if not (args.id or args.type or args.since):
        return fail("replay", "say what to replay: --id, --type and/or --since", 2)
    try:
        since = parse_since(args.since) if args.since else None
    except UsageError as exc:
        return fail("replay", str(exc), 2)
    params = {
        "ids": args.id or None,
        "type": _like(args.type) if args.type else None,
        "since": since,
        "limit": args.limit,
    }
    try:
        async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as conn:
            rows = await (await conn.execute(_SELECT, params)).fetchall()
            if args.force and rows and not args.dry_run:
                # Marked before publishing: a replay that dies in between leaves marks whose only effect
                # is that the next delivery of those events re-runs an idempotent handler.
                await conn.execute(_MARK, ([r[0] for r in rows],))
    except psycopg.Error as exc:
        return fail("replay", f"database error ({type(exc).__name__}: {str(exc).strip()[:200]})")
    missing = sorted(set(args.id or ()) - {r[0] for r in rows})
    errors: dict[str, str] = {}
    if rows and not args.dry_run:
        try:
            errors = await _publish_all(settings.amqp_url, rows, datetime.now(UTC))
        except Exception as exc:
            return fail("replay", f"cannot reach RabbitMQ ({type(exc).__name__}: {exc})")
    _report(args, rows, missing, errors)
    return 1 if errors or missing else 0


def _expectation(outcome: str | None, force: bool) -> str:
    if force:
        return "handler re-runs"
    if outcome in (None, "failed"):
        return "applied again"
    return "duplicate: no change"


def _report(
    args: argparse.Namespace, rows: list[tuple[Any, ...]], missing: list[str], errors: dict[str, str]
) -> None:
    published = [r for r in rows if r[0] not in errors] if not args.dry_run else []
    if args.json:
        print(
            dump_json(
                {
                    "dry_run": args.dry_run,
                    "force": args.force,
                    "selected": [
                        {"id": r[0], "type": r[1], "outcome": r[5], "expect": _expectation(r[5], args.force)}
                        for r in rows
                    ],
                    "published": [r[0] for r in published],
                    "errors": errors,
                    "not_in_ledger": missing,
                }
            )
        )
        return
    if rows:
        print(
            table(
                [
                    (iso(r[7]), r[0], r[1], r[5], errors.get(r[0]) or _expectation(r[5], args.force))
                    for r in rows
                ],
                ("CREATED", "EVENT ID", "TYPE", "OUTCOME", "EXPECT"),
            )
        )
    verb = "would be republished" if args.dry_run else "republished to stripe.events"
    print(
        f"{len(rows) if args.dry_run else len(published)} of {len(rows)} stored events {verb}"
        + (" (handlers will re-run)" if args.force else "")
    )
    for event_id in missing:
        print(f"not in the ledger: {event_id} (try `paybus reconcile` or `paybus dlq list --id {event_id}`)")


def cmd_replay(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay",
        help="republish stored events from the ledger to stripe.events",
        description=(__doc__ or "").split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--id", action="append", metavar="EVT", help="event id (repeatable)")
    p.add_argument("--type", help="event type, * wildcards (payment_intent.*)")
    p.add_argument("--since", help="events created within this duration (30m, 12h, 3d) or since an ISO time")
    p.add_argument("--limit", type=int, default=10_000, help="at most this many events (default 10000)")
    p.add_argument("--force", action="store_true", help="re-run the handler of already applied events")
    p.add_argument("--dry-run", action="store_true", help="list what would be replayed; change nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_replay)
