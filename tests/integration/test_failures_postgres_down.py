"""Postgres down: the processor stops taking work, reports not ready, and resumes by itself.

Runs against a private Postgres cluster that the test creates, stops and starts, so the machine's
shared server is never touched.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from shared import db, samples
from shared.amqp import DEAD_LETTER_QUEUE, EVENTS_QUEUE, retry_queue_name, retry_tiers
from tests.chaos.instances import PrivatePostgres
from tests.chaos.toolkit import declare, publish_events
from tests.conftest import env_for
from tests.support import Service, queue_depth, wait_for

DELAYS = (100, 200)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres().create()
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


def _readiness(port: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _events(count: int) -> list[bytes]:
    return [
        samples.encode(samples.sample_event("payment_intent.succeeded", user_id=str(uuid.uuid4())))
        for _ in range(count)
    ]


async def _applied(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (
            await conn.execute("SELECT count(*) FROM stripe_events WHERE outcome = 'applied'")
        ).fetchone()
        return int(row[0]) if row else 0


async def test_processor_waits_without_acking_or_dead_lettering_while_postgres_is_down_then_resumes(
    private_postgres: PrivatePostgres, make_vhost: Any, tmp_path: Path
) -> None:
    url = private_postgres.url("paybus")
    await asyncio.to_thread(db.migrate, url)
    amqp = make_vhost()
    await declare(amqp, DELAYS)
    env = env_for(url, amqp, PAYBUS_RETRY_DELAYS_MS=",".join(map(str, DELAYS)), PROCESSOR_PREFETCH="8")
    processor = Service("processor", env, tmp_path / "processor.log").start()
    try:
        processor.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz")
        await publish_events(amqp, _events(10))
        await wait_for(lambda: _is(_applied(url), 10))

        await asyncio.to_thread(private_postgres.stop)
        status, body = await wait_for(lambda: _not_ready(env["METRICS_PORT"]), timeout=15)
        assert status == 503 and "database unavailable" in body["reasons"]

        await publish_events(amqp, _events(30))
        await asyncio.sleep(3)  # long enough for a hot loop or a retry cascade to show
        held = 30 - await queue_depth(amqp, EVENTS_QUEUE)
        assert 0 <= held <= 8  # at most a prefetch worth is in hand, unacked; the rest was never taken
        assert await queue_depth(amqp, DEAD_LETTER_QUEUE) == 0
        for delay in {d for tier in retry_tiers(DELAYS) for d in tier}:
            assert await queue_depth(amqp, retry_queue_name(EVENTS_QUEUE, delay)) == 0

        await asyncio.to_thread(private_postgres.start)
        await wait_for(lambda: _is(_applied(url), 40), timeout=30)
        assert _readiness(env["METRICS_PORT"])[0] == 200
        assert await queue_depth(amqp, EVENTS_QUEUE) == 0
        assert await queue_depth(amqp, DEAD_LETTER_QUEUE) == 0
        log = processor.log()
        assert "transient failure" not in log and "dead-lettering" not in log  # nothing blamed on a message
    finally:
        processor.stop()


async def _is(count: Any, expected: int) -> bool:
    return bool(await count == expected)


async def _not_ready(port: str) -> tuple[int, dict[str, Any]] | None:
    status, body = await asyncio.to_thread(_readiness, port)
    return (status, body) if status == 503 else None
