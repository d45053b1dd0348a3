"""`paybus dlq list|show|requeue|purge`: read and repair `paybus.dead-letter` without losing a message.

The scan (see `shared.ops.deadletters`) holds every dead letter unacked until it ends: `list` and
`show` give all back; `requeue` acks one only after its copy is confirmed in the original exchange;
`purge` (with `--yes`) acks the selected ones. A killed command loses nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Any

from shared.ops.common import UsageError, dump_json, fail, iso, parse_since, settings_or_exit, table
from shared.ops.deadletters import DeadLetter, Filters, Scan, jsonable, open_channel, requeue_one


def _filters(args: argparse.Namespace) -> Filters:
    return Filters(
        ids=tuple(args.id or ()),
        types=tuple(args.type or ()),
        reasons=tuple(args.reason or ()),
        since=parse_since(args.since) if args.since else None,
    )


async def _run(args: argparse.Namespace) -> int:
    settings = settings_or_exit("dlq")
    command = f"dlq {args.action}"
    try:
        select = _filters(args)
    except UsageError as exc:
        return fail(command, str(exc), 2)
    if args.action == "purge" and not (args.yes or args.dry_run):
        return fail(
            command, "purging deletes dead letters for good: add --yes (or look first with --dry-run)", 2
        )
    try:
        connection, channel = await open_channel(settings.amqp_url)
    except Exception as exc:
        return fail(command, f"cannot reach RabbitMQ ({type(exc).__name__}: {exc})")
    scan = Scan(channel)
    errors: list[dict[str, Any]] = []
    done: list[DeadLetter] = []
    try:
        async with connection:
            try:
                await scan.run(select, args.limit)
                now = datetime.now(UTC)
                if args.action in ("requeue", "purge") and not args.dry_run:
                    for letter in scan.selected:
                        if args.action == "requeue":
                            error = await requeue_one(channel, letter, now)
                            if error:
                                errors.append({**letter.summary(), "requeue_error": error})
                                continue
                        await scan.ack(letter)  # only after the confirm: a kill before this leaves it here
                        done.append(letter)
            finally:
                await scan.settle()
    except Exception as exc:  # e.g. no dead-letter queue yet, or the broker went away: nothing was lost
        return fail(command, f"{type(exc).__name__}: {str(exc)[:200]} (unsettled messages stay in the queue)")
    _report(args, scan, done, errors)
    return 1 if errors else 0


def _report(
    args: argparse.Namespace, scan: Scan, done: list[DeadLetter], errors: list[dict[str, Any]]
) -> None:
    action, selected = args.action, scan.selected
    if args.json:
        if action in ("list", "show"):
            items = [letter.summary() for letter in selected]
            if action == "show":
                for item, letter in zip(items, selected, strict=True):
                    item["headers"] = {k: jsonable(v) for k, v in letter.headers.items()}
                    item["body"] = letter.body_text(args.raw)
            print(dump_json(items))
        else:
            print(
                dump_json(
                    {
                        "action": action,
                        "dry_run": bool(args.dry_run),
                        "scanned": len(scan.held),
                        "selected": [letter.summary() for letter in selected],
                        "done": [letter.event_id for letter in done],
                        "errors": errors,
                    }
                )
            )
        return
    if action == "show":
        for letter in selected:
            _show(letter, args.raw)
        if not selected:
            print("no matching dead letters")
        return
    rows = [
        (iso(x.dead_lettered_at), x.event_id, x.type, x.reason, x.attempts, (x.error or "")[:60])
        for x in selected
    ]
    if rows:
        print(table(rows, ("DEAD-LETTERED", "EVENT ID", "TYPE", "REASON", "ATTEMPTS", "ERROR")))
    verb = {"list": "matching", "requeue": "requeued", "purge": "purged"}[action]
    if args.dry_run and action != "list":
        verb = f"would be {verb}"
    count = len(selected) if action == "list" or args.dry_run else len(done)
    print(f"{count} {verb} of {len(scan.held)} dead letters scanned")
    for error in errors:
        print(f"not requeued {error['event_id']}: {error['requeue_error']}", file=sys.stderr)


def _show(letter: DeadLetter, raw: bool) -> None:
    s = letter.summary()
    print(f"=== {s['event_id']}  {s['type']}")
    for key in (
        "reason",
        "attempts",
        "error",
        "first_failed_at",
        "dead_lettered_at",
        "original_exchange",
        "original_routing_key",
        "original_queue",
    ):
        print(f"{key + ':':22} {s[key] if s[key] is not None else '-'}")
    print("headers:")
    for key, value in sorted(letter.headers.items()):
        print(f"  {key}: {json.dumps(jsonable(value), default=str)}")
    print("body:" + ("" if raw else "  (emails and client secrets redacted; --raw shows them)"))
    print(letter.body_text(raw))
    print()


def cmd_dlq(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def register(subparsers: Any) -> None:
    dlq = subparsers.add_parser("dlq", help="list, show, requeue or purge dead letters")
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    helps = {
        "list": "one line per dead letter (nothing is changed)",
        "show": "headers, reason, attempts and the readable body (nothing is changed)",
        "requeue": "republish to the original exchange and key (confirmed), then remove the dead letter",
        "purge": "delete dead letters for good (needs --yes)",
    }
    for action, text in helps.items():
        p = actions.add_parser(action, help=text, description=text)
        p.add_argument("--id", action="append", metavar="EVT", help="event id (repeatable)")
        p.add_argument("--type", action="append", metavar="TYPE", help="event type, * wildcards (repeatable)")
        p.add_argument(
            "--reason", action="append", help="reason such as poison, retries-exhausted, unknown-schema"
        )
        p.add_argument(
            "--since", help="dead-lettered within this duration (30m, 12h, 3d) or since an ISO time"
        )
        p.add_argument(
            "--limit",
            type=_positive,
            default=100 if action in ("list", "show") else None,
            help="at most this many messages" + (" (default 100)" if action in ("list", "show") else ""),
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if action == "show":
            p.add_argument("--raw", action="store_true", help="print the body exactly, without redaction")
        if action in ("requeue", "purge"):
            p.add_argument("--dry-run", action="store_true", help="say what would happen; change nothing")
        if action == "purge":
            p.add_argument("--yes", action="store_true", help="really delete the selected dead letters")
        p.set_defaults(func=cmd_dlq, action=action, dry_run=False, raw=False, yes=False)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value
