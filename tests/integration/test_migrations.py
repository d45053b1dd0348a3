"""Migrations apply, roll back fully and apply again on a fresh database; the CLI creates the database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from shared import db
from tests.support import database_url, unique

TABLES = {
    "stripe_events",
    "stripe_customers",
    "payments",
    "subscriptions",
    "invoices",
    "entitlements",
    "payment_requests",
    "outbox",
}


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_name NOT LIKE '%%yoyo%%'"
        ).fetchall()
    return {r[0] for r in rows}


def test_migrate_rollback_everything_and_migrate_again() -> None:
    url = database_url(unique("paybus_mig"))
    try:
        applied = db.migrate(url)
        assert applied and applied == sorted(applied)
        assert _tables(url) >= TABLES
        rolled_back = db.rollback(url)
        assert rolled_back == list(reversed(applied))
        assert not (TABLES & _tables(url))
        assert db.migrate(url) == applied
        assert _tables(url) >= TABLES
        assert db.migrate(url) == []  # up to date
    finally:
        db.drop_database(url)


def _payload_compression(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT attrelid::regclass::text, attcompression::text FROM pg_attribute"
            " WHERE attname = 'payload' AND attrelid IN ('stripe_events'::regclass, 'outbox'::regclass)"
        ).fetchall()
    return dict(rows)


def _lz4_available(url: str) -> bool:
    with psycopg.connect(url) as conn:
        try:
            conn.execute("CREATE TEMP TABLE lz4_probe (x text COMPRESSION lz4)")
        except (psycopg.errors.FeatureNotSupported, psycopg.errors.SyntaxError):
            return False
    return True


def test_payloads_are_compressed_with_lz4_where_the_server_has_it_and_back_on_rollback() -> None:
    url = database_url(unique("paybus_mig"))
    try:
        db.migrate(url)
        want = "l" if _lz4_available(url) else ""  # "" is the server's default (pglz)
        assert _payload_compression(url) == {"stripe_events": want, "outbox": want}
        assert db.rollback(url, count=2) == ["0007.ledger-hot-finish", "0006.payload-lz4"]
        assert _payload_compression(url) == {"stripe_events": "", "outbox": ""}
    finally:
        db.drop_database(url)


def _ledger_options(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT reloptions FROM pg_class WHERE oid = 'stripe_events'::regclass").fetchone()
    return list(row[0] or []) if row else []


def test_ledger_pages_keep_room_for_the_finishing_update_and_not_after_rollback() -> None:
    url = database_url(unique("paybus_mig"))
    try:
        db.migrate(url)
        assert _ledger_options(url) == ["fillfactor=50"]
        assert db.rollback(url, count=1) == ["0007.ledger-hot-finish"]
        assert _ledger_options(url) == []
    finally:
        db.drop_database(url)


def test_cli_migrate_creates_the_database_lists_and_rolls_back() -> None:
    url = database_url(unique("paybus_cli"))
    paybus = str(Path(sys.executable).parent / "paybus")
    env = {**os.environ, "DATABASE_URL": url}
    try:
        out = subprocess.run([paybus, "migrate"], env=env, capture_output=True, text=True, check=True).stdout
        assert "created database" in out and "0001.ledger" in out
        listing = subprocess.run(
            [paybus, "migrate", "--list"], env=env, capture_output=True, text=True, check=True
        )
        assert all(line.startswith("applied") for line in listing.stdout.splitlines())
        subprocess.run([paybus, "migrate", "--rollback"], env=env, capture_output=True, check=True)
        listing = subprocess.run(
            [paybus, "migrate", "--list"], env=env, capture_output=True, text=True, check=True
        )
        assert listing.stdout.splitlines()[-1].startswith("pending")
    finally:
        db.drop_database(url)


def test_cli_migrate_reports_an_unreachable_database_clearly() -> None:
    paybus = str(Path(sys.executable).parent / "paybus")
    env = {**os.environ, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"}
    result = subprocess.run([paybus, "migrate"], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "paybus migrate:" in result.stderr and "Traceback" not in result.stderr
