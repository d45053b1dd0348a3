"""Test harness for payment requests: the fake Stripe fixture and an in-process request processor.

Test modules import the fixtures by their function names (`fake_stripe_fixture`...); tests use `fake_stripe`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aio_pika
import msgspec
import pytest
from psycopg_pool import AsyncConnectionPool

from processor.catalog import load_catalog
from processor.requests.base import Deps
from processor.requests.dispatcher import RequestProcessor
from processor.stripe_api import StripeApi
from shared.config import Settings, load_settings
from tests.conftest import env_for
from tests.fakes.stripe_fake import FakeStripe
from tests.support import Service, create_vhost, delete_vhost, unique


@pytest.fixture(scope="module", name="fake_stripe")
def fake_stripe_fixture() -> Iterator[FakeStripe]:
    fake = FakeStripe().start()
    yield fake
    fake.stop()


def request_settings(database: str, amqp: str, stripe_url: str, **extra: str) -> Settings:
    return load_settings(
        env_for(
            database,
            amqp,
            STRIPE_API_BASE=stripe_url,
            STRIPE_SECRET_KEY="sk_test_paybus_suite",
            STRIPE_PUBLISHABLE_KEY="pk_test_paybus_suite",
            STRIPE_API_VERSION="2026-10-28.endive",
            **extra,
        )
    )


class InProcess:
    """A RequestProcessor wired to the session database, a vhost and the fake Stripe, without a consumer."""

    def __init__(
        self,
        processor: RequestProcessor,
        settings: Settings,
        pool: AsyncConnectionPool[Any],
        channel: Any,
        deps: Deps,
    ) -> None:
        self.processor = processor
        self.settings = settings
        self.pool = pool
        self.channel = channel
        self.deps = deps

    def with_settings(self, **changes: Any) -> RequestProcessor:
        """Another processor on the same resources with some settings changed."""
        settings = msgspec.structs.replace(self.settings, **changes)
        deps = msgspec.structs.replace(self.deps, settings=settings)
        return RequestProcessor(self.pool, self.channel, deps, settings.retry_delays_ms)

    async def send(self, kind: str, **fields: Any) -> dict[str, Any]:
        body = json.dumps({"kind": kind, **fields}).encode()
        reply = await self.processor.process(body, kind)
        return dict(msgspec.to_builtins(reply))


@pytest.fixture(name="in_process")
async def in_process_fixture(database: str, vhost: str, fake_stripe: FakeStripe) -> AsyncIterator[InProcess]:
    settings = request_settings(database, vhost, fake_stripe.url)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database, min_size=1, max_size=24, open=False, kwargs={"autocommit": True}
    )
    await pool.open()
    connection = await aio_pika.connect(vhost)
    channel = await connection.channel(publisher_confirms=True)
    stripe = StripeApi.from_settings(settings)
    deps = Deps(stripe=stripe, catalog=load_catalog(settings.catalog_path), settings=settings)
    try:
        yield InProcess(
            RequestProcessor(pool, channel, deps, settings.retry_delays_ms), settings, pool, channel, deps
        )
    finally:
        await stripe.close()
        await connection.close()
        await pool.close()


def new_user() -> str:
    return str(uuid.uuid4())


def new_key(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class PaybusWithFake:
    """`paybus ingress` and `paybus processor` as a user starts them, pointed at the fake Stripe."""

    def __init__(self, database: str, amqp: str, fake: FakeStripe, logs: Path) -> None:
        self.amqp = amqp
        self.fake = fake
        self.logs = logs
        self.env = env_for(
            database,
            amqp,
            STRIPE_API_BASE=fake.url,
            STRIPE_SECRET_KEY="sk_test_paybus_e2e",
            STRIPE_PUBLISHABLE_KEY="pk_test_paybus_e2e",
        )
        self.webhook_url = f"http://127.0.0.1:{self.env['INGRESS_PORT']}/webhook/stripe"
        self.ingress = Service("ingress", self.env, logs / "ingress.log")
        self.processor = Service("processor", self.env, logs / "processor.log")

    def start(self) -> PaybusWithFake:
        self.ingress.start()
        self.start_processor()
        self.ingress.wait_ready(f"http://127.0.0.1:{self.env['INGRESS_PORT']}/readyz")
        return self

    def start_processor(self) -> None:
        self.processor = Service("processor", self.env, self.logs / "processor.log").start()
        self.processor.wait_ready(f"http://127.0.0.1:{self.env['METRICS_PORT']}/readyz")

    def stop(self) -> None:
        self.processor.stop()
        self.ingress.stop()


@contextmanager
def paybus_with_fake(database: str, fake: FakeStripe, logs: Path) -> Iterator[PaybusWithFake]:
    """A vhost of its own, the two services, and everything removed afterwards."""
    name = unique("paybus_requests_e2e")
    system = PaybusWithFake(database, create_vhost(name), fake, logs)
    try:
        yield system.start()
    finally:
        system.stop()
        delete_vhost(name)
