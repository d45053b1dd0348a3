"""One trace from the webhook request through the publish to the processor's database work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aio_pika
import psycopg
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from psycopg_pool import AsyncConnectionPool

from ingress.app import create_app
from processor.catalog import load_catalog
from processor.consumer import Consumer, Forwarder
from processor.context import Context
from processor.events import handlers
from processor.pipeline import EventPipeline
from shared import samples
from shared.amqp import EVENTS_QUEUE
from shared.config import load_settings
from shared.publisher import Publisher
from tests.support import REPO, TEST_SECRET, signed, wait_for


async def test_webhook_to_row_is_one_trace(
    make_vhost: Callable[[], str], database: str, conn: psycopg.AsyncConnection[Any]
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    amqp = make_vhost()
    settings = load_settings(
        {"AMQP_URL": amqp, "DATABASE_URL": database, "STRIPE_WEBHOOK_SECRET": TEST_SECRET}
    )

    publisher = Publisher(amqp, 5)
    client = TestClient(TestServer(create_app(settings, publisher, tracer=provider.get_tracer("ingress"))))
    await client.start_server()
    assert await publisher.wait_connected(15)

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database, min_size=1, max_size=2, open=False)
    await pool.open()
    connection = await aio_pika.connect(amqp)
    channel = await connection.channel(publisher_confirms=True)
    pipeline = EventPipeline(
        pool,
        handlers(),
        Context(catalog=load_catalog(REPO / "catalog.toml")),
        tracer=provider.get_tracer("processor"),
    )
    forwarder = Forwarder(channel, EVENTS_QUEUE, (100,))
    await forwarder.open()

    async def db_check() -> None:
        async with pool.connection() as c:
            await c.execute("SELECT 1")

    consumer = Consumer(channel, EVENTS_QUEUE, pipeline, forwarder, db_check, prefetch=4)
    consuming = asyncio.create_task(consumer.run())
    try:
        envelope = samples.sample_event("payment_intent.succeeded")
        body, headers = signed(envelope)
        assert (await client.post("/webhook/stripe", data=body, headers=headers)).status == 200

        async def applied() -> bool:
            row = await (
                await conn.execute("SELECT outcome FROM stripe_events WHERE id = %s", (envelope["id"],))
            ).fetchone()
            return bool(row and row[0] == "applied")

        await wait_for(applied)
        spans = await wait_for(lambda: _spans_when(exporter, 4))
    finally:
        await consumer.stop()
        consuming.cancel()
        await connection.close()
        await pool.close()
        await client.close()

    by_kind = {span.kind: span for span in spans}
    assert set(by_kind) >= {SpanKind.SERVER, SpanKind.PRODUCER, SpanKind.CONSUMER, SpanKind.CLIENT}
    assert len({span.context.trace_id for span in spans}) == 1, (
        "ingress, broker hop and database share one trace"
    )
    # parentage: request -> publish -> process -> db
    assert by_kind[SpanKind.PRODUCER].parent.span_id == by_kind[SpanKind.SERVER].context.span_id
    assert by_kind[SpanKind.CONSUMER].parent.span_id == by_kind[SpanKind.PRODUCER].context.span_id
    assert by_kind[SpanKind.CLIENT].parent.span_id == by_kind[SpanKind.CONSUMER].context.span_id
    assert by_kind[SpanKind.CLIENT].attributes["db.system"] == "postgresql"
    assert by_kind[SpanKind.CONSUMER].attributes["stripe.event_id"] == envelope["id"]


async def _spans_when(exporter: InMemorySpanExporter, count: int) -> Any:
    spans = exporter.get_finished_spans()
    return spans if len(spans) >= count else None
