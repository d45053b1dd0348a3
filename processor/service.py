"""Composition root of the processor: pool, channel, topology, consumers, health endpoint."""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import timedelta
from typing import Any

import aio_pika
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from processor.catalog import load_catalog
from processor.consumer import Consumer, Forwarder
from processor.context import Context
from processor.events import handlers
from processor.pipeline import EventPipeline
from shared.amqp import EVENTS_QUEUE, declare_topology
from shared.config import Settings

log = logging.getLogger("paybus.processor")


async def _health_app(consumer: Consumer, connection: aio_pika.abc.AbstractRobustConnection) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        problems = []
        if connection.is_closed:
            problems.append("broker connection closed")
        if not consumer.db_ready.is_set():
            problems.append("database unavailable")
        if problems:
            return web.json_response({"status": "not ready", "reasons": problems}, status=503)
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(settings: Settings) -> None:
    catalog = load_catalog(settings.catalog_path)
    ctx = Context(catalog=catalog, grace=timedelta(days=settings.grace_days))
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url, min_size=2, max_size=max(4, min(settings.prefetch, 16)), open=False, timeout=5,
        kwargs={"autocommit": True},
    )
    await pool.open(wait=False)
    connection = await aio_pika.connect_robust(
        settings.amqp_url, client_properties={"connection_name": "paybus-processor"}
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner: web.AppRunner | None = None
    try:
        setup = await connection.channel()
        if settings.declare_topology:
            await declare_topology(setup)
        else:  # passive: no configure right needed; fail fast when the definitions were not loaded
            try:
                await setup.declare_queue(EVENTS_QUEUE, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity as exc:
                log.error("RabbitMQ topology missing (%s): load deploy/rabbitmq/definitions.json "
                          "or set PAYBUS_DECLARE_TOPOLOGY=true", exc)
                raise SystemExit(2) from None
        await setup.close()
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=settings.prefetch)
        forwarder = Forwarder(channel, EVENTS_QUEUE, settings.retry_delays_ms)
        await forwarder.open()

        async def db_check() -> None:
            async with pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")

        events = Consumer(
            channel, EVENTS_QUEUE, EventPipeline(pool, handlers(), ctx), forwarder, db_check, settings.prefetch
        )
        runner = web.AppRunner(await _health_app(events, connection), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.ingress_host, settings.metrics_port).start()
        log.info("processor consuming %s; health on :%d", EVENTS_QUEUE, settings.metrics_port)
        consuming = asyncio.create_task(events.run())
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({consuming, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if consuming in done:
            consuming.result()  # surface the crash
        log.info("processor stopping: finishing in-flight messages")
        await events.stop()
        consuming.cancel()
    finally:
        if runner is not None:
            await runner.cleanup()
        await connection.close()
        await pool.close()


def run(settings: Settings) -> None:
    asyncio.run(serve(settings))
