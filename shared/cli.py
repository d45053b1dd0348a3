"""The `paybus` command: services, migrations and operator tools, one subcommand each."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from shared.config import DEV_WEBHOOK_SECRET, ConfigError, Settings, load_settings
from shared.logs import setup_logging


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"paybus: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_ingress(args: argparse.Namespace) -> int:
    settings = _settings()
    setup_logging(settings.log_level)
    from ingress.__main__ import run

    return run(settings)


def cmd_processor(args: argparse.Namespace) -> int:
    settings = _settings()
    setup_logging(settings.log_level)
    from processor.catalog import CatalogError, load_catalog
    from processor.service import run

    try:
        load_catalog(settings.catalog_path)
    except CatalogError as exc:
        print(f"paybus: {exc}", file=sys.stderr)
        return 2
    run(settings)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from shared import db

    settings = _settings()
    try:
        if args.list:
            for migration_id, applied in db.migration_status(settings.database_url):
                print(f"{'applied' if applied else 'pending'}  {migration_id}")
            return 0
        if args.rollback:
            done = db.rollback(settings.database_url, None if args.all else args.count)
            print("rolled back: " + (", ".join(done) if done else "nothing"))
            return 0
        created = db.ensure_database(settings.database_url)
        if created:
            print(f"created database {db.database_name(settings.database_url)}")
        done = db.migrate(settings.database_url)
        print("applied: " + (", ".join(done) if done else "nothing (up to date)"))
    except Exception as exc:  # report, don't trace: this is an operator command
        print(f"paybus migrate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_send_event(args: argparse.Namespace) -> int:
    from ingress.signature import signature_header
    from shared import samples

    settings = _settings()
    source = args.event
    if Path(source).is_file():
        body = Path(source).read_bytes()
        try:
            envelope = json.loads(body)
        except ValueError:
            print(f"paybus send-event: {source} is not JSON", file=sys.stderr)
            return 2
    else:
        try:
            envelope = samples.sample_event(source, user_id=args.user)
        except KeyError as exc:
            print(f"paybus send-event: {exc.args[0]}", file=sys.stderr)
            return 2
        body = samples.encode(envelope)
    url = args.url or f"http://{settings.ingress_host}:{settings.ingress_port}{settings.webhook_path}"
    header = signature_header(body, settings.webhook_secrets[0], int(time.time()))
    request = urllib.request.Request(  # noqa: S310 - URL is the operator's own ingress
        url,
        data=body,
        method="POST",
        headers={"Stripe-Signature": header, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        print(f"paybus send-event: cannot reach the ingress at {url}: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {"status": status, "response": text, "event_id": envelope.get("id"), "type": envelope.get("type")}
        )
    )
    return 0 if 200 <= status < 300 else 1


def cmd_dev(args: argparse.Namespace) -> int:
    """Migrate, then run ingress and processor together until Ctrl-C (what `make run` does)."""
    settings = _settings()
    if cmd_migrate(argparse.Namespace(list=False, rollback=False, all=False, count=1)) != 0:
        return 1
    url = f"http://{settings.ingress_host}:{settings.ingress_port}{settings.webhook_path}"
    print(f"webhook URL:    {url}")
    if settings.webhook_secrets == (DEV_WEBHOOK_SECRET,):
        print(f"webhook secret: {DEV_WEBHOOK_SECRET}  (development default; set STRIPE_WEBHOOK_SECRET)")
    print("send a test event: .venv/bin/paybus send-event payment_intent.succeeded")
    print("stop with Ctrl-C")
    sys.stdout.flush()
    exe = [sys.executable, "-m", "shared.cli"]
    children = [subprocess.Popen([*exe, name], env=os.environ.copy()) for name in ("ingress", "processor")]
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
    return max((child.returncode or 0) for child in children)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paybus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("ingress", help="run the webhook ingress").set_defaults(func=cmd_ingress)
    sub.add_parser("processor", help="run the event and request processor").set_defaults(func=cmd_processor)
    sub.add_parser("dev", help="migrate, then run ingress and processor together").set_defaults(func=cmd_dev)

    migrate = sub.add_parser("migrate", help="apply database migrations (creates the database if missing)")
    migrate.add_argument("--rollback", action="store_true", help="roll back the newest migration")
    migrate.add_argument("--all", action="store_true", help="with --rollback: roll back every migration")
    migrate.add_argument("--count", type=int, default=1, help="with --rollback: how many (default 1)")
    migrate.add_argument("--list", action="store_true", help="list migrations and whether each is applied")
    migrate.set_defaults(func=cmd_migrate)

    send = sub.add_parser(
        "send-event", help="sign a sample event (or a JSON file) and POST it to the ingress"
    )
    send.add_argument(
        "event", metavar="TYPE|FILE", help="event type such as payment_intent.succeeded, or a file"
    )
    send.add_argument("--url", help="webhook URL (default: from INGRESS_HOST/PORT and WEBHOOK_PATH_TOKEN)")
    send.add_argument("--user", help="user UUID to put in metadata.user_id (default: a new one)")
    send.set_defaults(func=cmd_send_event)

    from shared.ops import dlq, inspect, reconcile, replay  # operator tools (shared/ops/)
    from shared.request_cli import add_request_command

    add_request_command(sub)
    for tool in (dlq, replay, reconcile, inspect):
        tool.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
