"""Postgres connections and migrations (yoyo); creates the database when it is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from shared.config import REPO_ROOT

MIGRATIONS_DIR: Final = REPO_ROOT / "migrations"


def database_name(url: str) -> str:
    name = conninfo_to_dict(url).get("dbname")
    if not name:
        raise ValueError("DATABASE_URL names no database")
    return str(name)


def maintenance_url(url: str) -> str:
    """The same server, database `postgres`: where CREATE/DROP DATABASE is run from."""
    return make_conninfo(url, dbname="postgres")


def ensure_database(url: str) -> bool:
    """Create the database named by ``url`` if it does not exist; return whether it was created."""
    name = database_name(url)
    with psycopg.connect(maintenance_url(url), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:  # created concurrently by another migrate
            return False
        return True


def drop_database(url: str) -> None:
    name = database_name(url)
    with psycopg.connect(maintenance_url(url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _yoyo_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = "postgresql+psycopg"
    if parts.scheme not in {"postgresql", "postgres"}:
        raise ValueError("DATABASE_URL must be a postgresql:// URL")
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def _backend_and_migrations(url: str):  # type: ignore[no-untyped-def]
    from yoyo import get_backend, read_migrations

    return get_backend(_yoyo_url(url)), read_migrations(str(MIGRATIONS_DIR))


def migrate(url: str) -> list[str]:
    """Apply every pending migration; return the ids applied."""
    ensure_database(url)
    backend, migrations = _backend_and_migrations(url)
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending]


def rollback(url: str, count: int | None = None) -> list[str]:
    """Roll back the newest ``count`` applied migrations (all when None); return their ids."""
    backend, migrations = _backend_and_migrations(url)
    with backend.lock():
        applied = backend.to_rollback(migrations)
        chosen = applied if count is None else applied[:count]
        backend.rollback_migrations(chosen)
    return [m.id for m in chosen]


def migration_status(url: str) -> list[tuple[str, bool]]:
    backend, migrations = _backend_and_migrations(url)
    return [(m.id, backend.is_applied(m)) for m in migrations]


def migrations_path() -> Path:
    return MIGRATIONS_DIR
