"""The request side of the processor: its own pool, channel, Stripe client and `Consumer`.

Requests get their own small pool because each in-flight request holds a connection across its Stripe
call (the row lock that makes duplicates wait): slow Stripe answers must not starve event processing.
"""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractRobustConnection
from psycopg_pool import AsyncConnectionPool

from processor.catalog import Catalog
from processor.consumer import Consumer, Forwarder
from processor.requests.base import Deps
from processor.requests.dispatcher import RequestProcessor
from processor.stripe_api import StripeApi
from shared.amqp import REQUESTS_QUEUE
from shared.config import Settings
from shared.telemetry import ProcessorMetrics


class RequestService:
    """Owns what the request consumer needs; `close()` after the consumer stopped."""

    def __init__(self, consumer: Consumer, pool: AsyncConnectionPool[Any], stripe: StripeApi) -> None:
        self.consumer = consumer
        self._pool = pool
        self._stripe = stripe

    async def close(self) -> None:
        await self._stripe.close()
        await self._pool.close()


async def open_request_service(
    settings: Settings,
    connection: AbstractRobustConnection,
    catalog: Catalog,
    metrics: ProcessorMetrics | None = None,
) -> RequestService:
    concurrency = min(settings.prefetch, 16)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=concurrency + 1,
        open=False,
        timeout=10,
        kwargs={"autocommit": True},
    )
    await pool.open(wait=False)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=concurrency)
    forwarder = Forwarder(channel, REQUESTS_QUEUE, settings.retry_delays_ms, metrics)
    await forwarder.open()
    stripe = StripeApi.from_settings(settings, metrics)
    work = RequestProcessor(
        pool,
        channel,
        Deps(stripe=stripe, catalog=catalog, settings=settings),
        settings.retry_delays_ms,
        metrics=metrics,
    )

    async def db_check() -> None:
        async with pool.connection(timeout=2) as conn:
            await conn.execute("SELECT 1")

    consumer = Consumer(channel, REQUESTS_QUEUE, work, forwarder, db_check, concurrency)
    return RequestService(consumer, pool, stripe)
