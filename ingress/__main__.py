"""Composition root of the ingress: settings, publisher, app, server (and its worker processes, if any)."""

from __future__ import annotations

import logging

from aiohttp import web
from opentelemetry import trace

from ingress.app import create_app
from ingress.workers import Workers, is_worker
from shared import heap
from shared.config import Settings
from shared.loops import loop_factory, loop_name
from shared.publisher import Publisher
from shared.telemetry import PropagatingTracer, export_configured, setup_tracing, shutdown_tracing

log = logging.getLogger("paybus.ingress")

SHUTDOWN_TIMEOUT = 15.0
CONNECT_BEFORE_LISTEN = 10.0


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; the exit status is 1 when a worker process died."""
    provider = None
    tracer: trace.Tracer = PropagatingTracer()  # no exporter: carry the trace context, record nothing
    if export_configured():
        provider = setup_tracing("ingress")
        trace.set_tracer_provider(provider)
        tracer = provider.get_tracer("paybus.ingress")
    publisher = Publisher(settings.amqp_url, settings.publish_timeout, declare=settings.declare_topology)
    app = create_app(settings, publisher, tracer=tracer)
    loop = loop_factory(settings.event_loop)()

    async def settled(app: web.Application) -> None:
        heap.settle()  # in each process, once its app has started

    workers = None
    if settings.ingress_workers > 1:

        async def connected_first(app: web.Application) -> None:
            # With several processes on one port, one that listens before its broker connection is up
            # would take a share of the connections only to answer 503; so each waits (boundedly: if the
            # broker is down it listens anyway, answers 503 and reconnects in the background).
            await publisher.wait_connected(CONNECT_BEFORE_LISTEN)

        app.on_startup.append(connected_first)
    app.on_startup.append(settled)
    if not is_worker():
        if settings.ingress_workers > 1:
            workers = Workers(settings.ingress_workers - 1)
            workers.attach(app, SHUTDOWN_TIMEOUT + 5)
        log.info(
            "ingress listening on http://%s:%d%s (%d process%s); event loop %s",
            settings.ingress_host,
            settings.ingress_port,
            settings.webhook_path if not settings.webhook_path_token else "/webhook/stripe/<token>",
            settings.ingress_workers,
            "es" if settings.ingress_workers > 1 else "",
            loop_name(loop),
        )
    # run_app stops accepting on SIGTERM/SIGINT and lets in-flight requests finish (shutdown_timeout).
    web.run_app(
        app,
        loop=loop,
        host=settings.ingress_host,
        port=settings.ingress_port,
        reuse_port=settings.ingress_workers > 1,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        print=None,
        access_log=None,
        handle_signals=True,
    )
    if provider is not None:
        shutdown_tracing(provider)
    return 1 if workers is not None and workers.failed else 0


if __name__ == "__main__":
    from shared.cli import main

    main(["ingress"])
