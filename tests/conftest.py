"""Shared fixtures: each test session gets its own Postgres database and RabbitMQ vhost."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from shared import db
from shared.config import Settings, load_settings
from tests.support import TEST_SECRET, create_vhost, database_url, delete_vhost, free_port, unique


@pytest.fixture(scope="session")
def database() -> Iterator[str]:
    """A migrated database of this session's own, dropped at the end."""
    url = database_url(unique("paybus_test"))
    db.migrate(url)
    yield url
    db.drop_database(url)


@pytest.fixture(scope="session")
def vhost() -> Iterator[str]:
    """The AMQP URL of a vhost of this session's own, deleted at the end."""
    name = unique("paybus_test")
    url = create_vhost(name)
    yield url
    delete_vhost(name)


@pytest.fixture
def make_vhost() -> Iterator[Callable[[], str]]:
    """Fresh vhosts for tests that count messages in queues; all deleted after the test."""
    names: list[str] = []

    def make() -> str:
        name = unique("paybus_test")
        names.append(name)
        return create_vhost(name)

    yield make
    for name in names:
        delete_vhost(name)


def env_for(database: str, amqp: str, **extra: str) -> dict[str, str]:
    """Environment for a paybus process pointed at the test database and vhost."""
    env = {
        "PAYBUS_ENV": "development",
        "DATABASE_URL": database,
        "AMQP_URL": amqp,
        "STRIPE_WEBHOOK_SECRET": TEST_SECRET,
        "INGRESS_HOST": "127.0.0.1",
        "INGRESS_PORT": str(free_port()),
        "METRICS_PORT": str(free_port()),
        "LOG_LEVEL": "INFO",
        "CATALOG_PATH": str(Path(__file__).resolve().parent.parent / "catalog.toml"),
        "PAYBUS_RETRY_DELAYS_MS": "200,400",
    }
    env.update(extra)
    return env


@pytest.fixture
def settings(database: str, vhost: str) -> Settings:
    return load_settings(env_for(database, vhost))


@pytest.fixture
async def conn(database: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as connection:
        yield connection
