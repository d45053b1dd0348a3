"""Composition root of the processor: pool, channel, topology, consumers, health and metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from datetime import timedelta
from typing import Any, Final

import aio_pika
import psycopg
from aio_pika.abc import AbstractChannel
from aiohttp import web
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool

from processor.batching import EventBatcher
from processor.catalog import load_catalog
from processor.consumer import Consumer, Forwarder, LinkSource
from processor.context import Context
from processor.events import Handler, handlers
from processor.outbox import OutboxRelay, relay_publisher
from processor.pipeline import EventPipeline
from processor.pooling import IdleCheck
from processor.requests.runner import RequestService, open_request_service
from shared import heap
from shared.amqp import DEAD_LETTER_QUEUE, EVENTS_QUEUE, REQUESTS_QUEUE, declare_topology, topology
from shared.config import Settings
from shared.loops import loop_factory, loop_name
from shared.publisher import Publisher
from shared.telemetry import ProcessorMetrics, setup_tracing, shutdown_tracing

log = logging.getLogger("paybus.processor")

RELAY_CONNECT_TIMEOUT = 10.0


def _health_app(
    consumer: Consumer, connection: aio_pika.abc.AbstractRobustConnection, metrics: ProcessorMetrics
) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        problems = []
        if connection.is_closed:
            problems.append("broker connection closed")
        if consumer.source.is_closed and consumer.db_ready.is_set():
            problems.append("event queue link closed")
        if not consumer.db_ready.is_set():
            problems.append("database unavailable")
        if problems:
            return web.json_response({"status": "not ready", "reasons": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_view(request: web.Request) -> web.Response:
        metrics.database_up.set(1 if consumer.db_ready.is_set() else 0)
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app


async def _watch_queues(channel: AbstractChannel, metrics: ProcessorMetrics, every: float = 10.0) -> None:
    """Queue depths for /metrics: one passive declare per queue every few seconds, cheap for the broker."""
    while True:
        for name in (EVENTS_QUEUE, REQUESTS_QUEUE, DEAD_LETTER_QUEUE):
            with contextlib.suppress(Exception):
                declared = await channel.declare_queue(name, passive=True)
                metrics.queue_depth.labels(name).set(declared.declaration_result.message_count or 0)
        await asyncio.sleep(every)


async def plan_each_execution(conn: psycopg.AsyncConnection[Any]) -> None:
    """Plan every execution of a prepared statement with the table statistics of the moment.

    psycopg prepares a statement on its fifth use; after five more, Postgres may switch it to one generic
    plan for the life of the connection, costed with the statistics of that moment. A processor started
    on an empty database froze plans made for tables of a hundred rows (a sequential scan of `payments`
    for `pi = $1 OR cs = $2`, 40 million rows read in a 30,000-event drain, the drain slowing as the table
    grew). Planning each time costs microseconds; parsing is still saved.
    """
    await conn.execute("SET plan_cache_mode = force_custom_plan")


_STATISTICS_SETTINGS: Final = (
    "SELECT name, setting FROM pg_settings WHERE name IN ('autovacuum', 'track_counts')"
)


def statistics_warning(settings: dict[str, str]) -> str | None:
    """What to tell the operator when nothing will keep the tables' statistics (``pg_settings`` values).

    The batch statements find rows by arrays of ids (`= ANY(%s)`). Planned without statistics, an array
    of 150 ids looks like most of the table, so a batch read all 30,000 `charges` rows to find its 150,
    and the drain slowed as tables grew (`tests/bench/README.md`, "Statistics"). Autovacuum's ANALYZE
    keeps the estimates true; with it off, someone must run ANALYZE.
    """
    off = sorted(name for name in ("autovacuum", "track_counts") if settings.get(name, "on") != "on")
    if not off:
        return None
    return (
        f"Postgres has {' and '.join(off)} off: nothing analyzes paybus's tables, and batch lookups "
        "may read whole tables as they grow; turn it on or run ANALYZE regularly (see deploy/RUNBOOK.md)"
    )


async def warn_without_statistics(database_url: str) -> None:
    """Log `statistics_warning` once at start (best effort: a database still down is reported elsewhere)."""
    with contextlib.suppress(psycopg.Error, OSError):
        async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=5) as conn:
            rows = await (await conn.execute(_STATISTICS_SETTINGS)).fetchall()
        warning = statistics_warning({str(name): str(value) for name, value in rows})
        if warning:
            log.warning(warning)


async def serve(settings: Settings, event_handlers: dict[str, Handler] | None = None) -> None:
    """The processor until SIGTERM. ``event_handlers`` replaces the routing table (the bench's ceiling
    runs with none: every event is then recorded as `ignored`)."""
    catalog = load_catalog(settings.catalog_path)
    ctx = Context(catalog=catalog, grace=timedelta(days=settings.grace_days))
    provider = setup_tracing("processor")
    trace.set_tracer_provider(provider)
    tracer = provider.get_tracer("paybus.processor")
    metrics = ProcessorMetrics()
    idle_check = IdleCheck()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url,
        min_size=2,
        max_size=max(4, min(settings.prefetch, 16)),
        open=False,
        timeout=5,
        kwargs={"autocommit": True},
        configure=plan_each_execution,
        # after a Postgres restart every pooled connection is dead: test on checkout, not on a message
        # (`processor.pooling`: only a connection that sat idle)
        check=idle_check.check,
        reset=idle_check.reset,
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
    background: list[asyncio.Task[None]] = []
    requests: RequestService | None = None
    relay_link: Publisher | None = None
    event_source: LinkSource | None = None
    try:
        setup = await connection.channel()
        if settings.declare_topology:
            # with the configured delays: the Forwarder publishes to these delay queues by name
            try:
                await declare_topology(setup, topology(settings.retry_delays_ms))
            except aio_pika.exceptions.ChannelPreconditionFailed as exc:
                log.error("RabbitMQ topology conflict, see deploy/RUNBOOK.md (topology conflicts): %s", exc)
                raise SystemExit(2) from None
        else:  # passive: no configure right needed; fail fast when the definitions were not loaded
            try:
                for queue in (EVENTS_QUEUE, REQUESTS_QUEUE):
                    await setup.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity as exc:
                log.error(
                    "RabbitMQ topology missing (%s): load deploy/rabbitmq/definitions.json "
                    "or set PAYBUS_DECLARE_TOPOLOGY=true",
                    exc,
                )
                raise SystemExit(2) from None
            setup = await connection.channel()  # a failed passive declare closes the channel
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=settings.prefetch)
        forwarder = Forwarder(channel, EVENTS_QUEUE, settings.retry_delays_ms, metrics)
        await forwarder.open()

        async def db_check() -> None:
            # its own connection, not the pool's: a pool busy under load must not look like an outage
            async with await psycopg.AsyncConnection.connect(
                settings.database_url, connect_timeout=3, autocommit=True
            ) as conn:
                await conn.execute("SELECT 1")

        table = handlers() if event_handlers is None else event_handlers
        pipeline = EventPipeline(pool, table, ctx, metrics, tracer)
        batcher = EventBatcher(pipeline, max_batch=settings.batch_size)
        # The event queue on a lean link of its own (`shared.consume_link`); retries, dead letters and
        # the request queue stay on aio-pika's channel.
        event_source = LinkSource(
            settings.amqp_url, EVENTS_QUEUE, settings.prefetch, name="paybus-processor-events"
        )
        events = Consumer(
            event_source, EVENTS_QUEUE, batcher, forwarder, db_check, settings.prefetch, coalesce_acks=True
        )
        requests = await open_request_service(settings, connection, catalog, metrics)
        runner = web.AppRunner(_health_app(events, connection, metrics), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.ingress_host, settings.metrics_port).start()
        log.info(
            "processor consuming %s, %s; health and metrics on :%d; event loop %s",
            EVENTS_QUEUE,
            REQUESTS_QUEUE,
            settings.metrics_port,
            loop_name(asyncio.get_running_loop()),
        )
        heap.settle()
        background.append(asyncio.create_task(warn_without_statistics(settings.database_url)))
        background.append(asyncio.create_task(_watch_queues(setup, metrics)))
        consuming = asyncio.create_task(events.run())
        answering = asyncio.create_task(requests.consumer.run())
        relay_link = relay_publisher(settings.amqp_url)
        await relay_link.start()
        await relay_link.wait_connected(RELAY_CONNECT_TIMEOUT)  # else the relay backs off until it is
        relay = OutboxRelay(pool, relay_link, settings.database_url, metrics=metrics)
        relaying = asyncio.create_task(relay.run())
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({consuming, answering, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in done & {consuming, answering}:
            task.result()  # surface the crash
        log.info("processor stopping: finishing in-flight messages")
        await asyncio.gather(events.stop(), requests.consumer.stop())
        if events.acks is not None:
            log.info("events acked: %d messages in %d ack frames", events.acks.acked, events.acks.frames)
        log.info(
            "event batches: %d, %d applied again in order; %d PaymentIntent chains applied as sets;"
            " %d subscription events applied as sets; %d invoice events applied as sets;"
            " %d customer events applied as sets",
            batcher.batches,
            batcher.entangled,
            batcher.intent_chains,
            batcher.subscription_chains,
            batcher.invoice_chains,
            batcher.customer_chains,
        )
        consuming.cancel()
        answering.cancel()
        relay.stop()
        await asyncio.wait({relaying}, timeout=5)
        relaying.cancel()
    finally:
        for task in background:
            task.cancel()
        if runner is not None:
            await runner.cleanup()
        if requests is not None:
            await requests.close()
        if relay_link is not None:
            await relay_link.close()
        if event_source is not None:
            await event_source.close()
        await connection.close()
        await pool.close()
        shutdown_tracing(provider)


def run(settings: Settings, event_handlers: dict[str, Handler] | None = None) -> None:
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        runner.run(serve(settings, event_handlers))
