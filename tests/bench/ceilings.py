"""What the broker and the database can take from Python at all: confirmed publishes and batched inserts."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import aio_pika
import psycopg

from shared.amqp import declare_topology
from shared.envelope import H_EVENT_ID, H_LIVEMODE, H_RECEIVED_AT
from shared.publisher import Publisher

IN_FLIGHT = 64


async def publish_events(amqp_url: str, events: Sequence[tuple[str, str, bytes]]) -> float:
    """Publish (id, type, body) to `stripe.events` as the ingress does, 64 confirms in flight; return s.

    Over the ingress's own publisher and link (mandatory, persistent, confirmed, the ingress's headers).
    This is both how the drain's backlog is made and the raw-publish ceiling: the messages land in the
    same quorum work queue the ingress feeds.
    """
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await declare_topology(await connection.channel())
    publisher = Publisher(amqp_url, 30, declare=False, name="paybus-bench")
    await publisher.start()
    try:
        if not await publisher.wait_connected(30):
            raise RuntimeError("the bench's publisher could not connect")
        pending = iter(events)

        async def worker() -> None:
            for event_id, event_type, body in pending:
                await publisher.publish(
                    body,
                    event_type,
                    message_type=event_type,
                    headers={
                        H_EVENT_ID: event_id,
                        H_LIVEMODE: False,
                        H_RECEIVED_AT: datetime.now(UTC).isoformat(),
                    },
                )

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        return time.perf_counter() - started
    finally:
        await publisher.close()


def batched_inserts(database_url: str, events: Sequence[tuple[str, str, bytes]], batch: int = 500) -> float:
    """Insert ledger-shaped rows (payload as jsonb) in transactions of ``batch``; return seconds.

    A scratch copy of `stripe_events` (same columns and indexes) keeps the real ledger untouched.
    """
    rows = [(event_id, event_type, body.decode()) for event_id, event_type, body in events]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_ceiling_events (LIKE stripe_events INCLUDING ALL)")
        try:
            started = time.perf_counter()
            for offset in range(0, len(rows), batch):
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO bench_ceiling_events (id, type, created, livemode, payload, received_at)"
                        " VALUES (%s, %s, now(), false, %s::jsonb, now())",
                        rows[offset : offset + batch],
                    )
            return time.perf_counter() - started
        finally:
            conn.execute("DROP TABLE bench_ceiling_events")


def processor_with_handlers(subset: str) -> list[str]:
    """The processor with part of its routing table (`tests/bench/handlers_subset.py`); with "none", the
    drain's ceiling."""
    return [sys.executable, "-m", "tests.bench.handlers_subset", subset]
