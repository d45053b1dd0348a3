"""Event batches: many messages share one transaction, and one bad message cannot hurt the others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import psycopg
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from psycopg_pool import AsyncConnectionPool

from processor.batching import EventBatcher
from processor.catalog import load_catalog
from processor.context import Context
from processor.errors import Reject
from processor.events import handlers
from processor.pipeline import EventPipeline
from shared import samples
from tests.support import REPO


class Delivery(msgspec.Struct):
    """The fields of an AMQP delivery the event path reads (a real broker is not what is tested here)."""

    body: bytes
    type: str = "payment_intent.succeeded"
    routing_key: str = "payment_intent.succeeded"
    headers: dict[str, Any] = {}


@pytest.fixture
async def batcher(database: str) -> AsyncIterator[tuple[EventBatcher, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database, min_size=1, max_size=4, open=False)
    await pool.open()
    pipeline = EventPipeline(
        pool,
        handlers(),
        Context(catalog=load_catalog(REPO / "catalog.toml")),
        tracer=provider.get_tracer("t"),
    )
    batcher = EventBatcher(pipeline, max_batch=10, linger=0.05)
    yield batcher, exporter
    await batcher.close()
    await pool.close()


async def _outcomes(conn: psycopg.AsyncConnection[Any], ids: list[str]) -> dict[str, str]:
    rows = await (
        await conn.execute("SELECT id, outcome FROM stripe_events WHERE id = ANY(%s)", (ids,))
    ).fetchall()
    return dict(rows)


async def test_ten_messages_commit_in_one_batch(batcher: Any, conn: psycopg.AsyncConnection[Any]) -> None:
    work, exporter = batcher
    envelopes = [samples.sample_event("payment_intent.succeeded") for _ in range(10)]
    await asyncio.gather(*(work(Delivery(samples.encode(e))) for e in envelopes))  # type: ignore[arg-type]
    ids = [e["id"] for e in envelopes]
    assert await _outcomes(conn, ids) == dict.fromkeys(ids, "applied")
    batches = [s for s in exporter.get_finished_spans() if s.name == "db apply_batch"]
    assert [s.attributes["paybus.batch_size"] for s in batches] == [10]
    assert len(batches[0].links) == 9  # the other messages' spans are linked to the shared transaction


async def test_a_bad_message_falls_back_alone_and_the_rest_are_applied(
    batcher: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    work, _ = batcher
    good = [samples.sample_event("payment_intent.succeeded") for _ in range(5)]
    bad = samples.sample_event("payment_intent.succeeded")
    bad["data"]["object"]["amount"] = "a lot"
    deliveries = [Delivery(samples.encode(e)) for e in [*good[:3], bad, *good[3:]]]
    results = await asyncio.gather(*(work(d) for d in deliveries), return_exceptions=True)  # type: ignore[arg-type]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], Reject) and errors[0].reason == "invalid-payload"
    assert results[3] is errors[0]
    ids = [e["id"] for e in good]
    assert await _outcomes(conn, [*ids, bad["id"]]) == {**dict.fromkeys(ids, "applied"), bad["id"]: "failed"}
    payments = await (
        await conn.execute(
            "SELECT count(*) FROM payments WHERE stripe_payment_intent_id = ANY(%s)",
            ([e["data"]["object"]["id"] for e in [*good, bad]],),
        )
    ).fetchone()
    assert payments == (5,)  # nothing half-written for the bad one


async def test_a_duplicate_inside_one_batch_is_applied_once(
    batcher: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    work, _ = batcher
    envelope = samples.sample_event("payment_intent.succeeded")
    body = samples.encode(envelope)
    await asyncio.gather(*(work(Delivery(body)) for _ in range(4)))  # type: ignore[arg-type]
    row = await (
        await conn.execute(
            "SELECT count(*) FROM payments WHERE stripe_payment_intent_id = %s",
            (envelope["data"]["object"]["id"],),
        )
    ).fetchone()
    assert row == (1,)
    assert await _outcomes(conn, [envelope["id"]]) == {envelope["id"]: "applied"}


async def test_a_backlog_drains_in_full_batches_one_at_a_time(
    batcher: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    """Messages that arrive while a batch runs wait for it and form the next one: no small concurrent
    batches that would contend for the same rows and connections."""
    work, exporter = batcher
    envelopes = [samples.sample_event("payment_intent.succeeded") for _ in range(35)]
    await asyncio.gather(*(work(Delivery(samples.encode(e))) for e in envelopes))  # type: ignore[arg-type]
    ids = [e["id"] for e in envelopes]
    assert await _outcomes(conn, ids) == dict.fromkeys(ids, "applied")
    batches = sorted(
        (s for s in exporter.get_finished_spans() if s.name == "db apply_batch"),
        key=lambda s: s.start_time or 0,
    )
    assert [s.attributes["paybus.batch_size"] for s in batches] == [10, 10, 10, 5]
    for earlier, later in zip(batches, batches[1:], strict=False):
        assert (later.start_time or 0) >= (earlier.end_time or 0), "two batches ran at the same time"


async def test_a_batch_of_events_already_applied_changes_nothing(
    batcher: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    work, exporter = batcher
    envelopes = [samples.sample_event("payment_intent.succeeded") for _ in range(10)]
    bodies = [samples.encode(e) for e in envelopes]
    await asyncio.gather(*(work(Delivery(b)) for b in bodies))  # type: ignore[arg-type]
    users = [e["data"]["object"]["metadata"]["user_id"] for e in envelopes]
    count = "SELECT count(*) FROM outbox WHERE user_id = ANY(%s::uuid[])"
    # a re-applied event would be re-stamped (processed_at is the applying transaction's time) even when
    # its handler changed nothing; a duplicate leaves its ledger row as it was
    stamps = "SELECT id, processed_at FROM stripe_events WHERE id = ANY(%s) ORDER BY id"
    ids = [e["id"] for e in envelopes]
    before = await (await conn.execute(count, (users,))).fetchone()
    stamped = await (await conn.execute(stamps, (ids,))).fetchall()
    assert before is not None and before[0] >= 10
    await asyncio.gather(*(work(Delivery(b)) for b in reversed(bodies)))  # type: ignore[arg-type]
    assert await (await conn.execute(count, (users,))).fetchone() == before
    assert await (await conn.execute(stamps, (ids,))).fetchall() == stamped
    batches = [
        s.attributes["paybus.batch_size"] for s in exporter.get_finished_spans() if s.name == "db apply_batch"
    ]
    assert batches == [10, 10]  # the second delivery went through the batch path too, as duplicates
