"""Composition root of the ingress: settings, publisher, app, server."""

from __future__ import annotations

import logging

from aiohttp import web
from opentelemetry import trace

from ingress.app import create_app
from ingress.publisher import Publisher
from shared.config import Settings
from shared.telemetry import PropagatingTracer, export_configured, setup_tracing, shutdown_tracing

log = logging.getLogger("paybus.ingress")


def run(settings: Settings) -> None:
    provider = setup_tracing("ingress")
    trace.set_tracer_provider(provider)
    publisher = Publisher(settings.amqp_url, settings.publish_timeout, declare=settings.declare_topology)
    # without an exporter, recorded spans would be thrown away: carry the trace context only (2x cheaper)
    tracer = provider.get_tracer("paybus.ingress") if export_configured() else PropagatingTracer()
    app = create_app(settings, publisher, tracer=tracer)
    log.info(
        "ingress listening on http://%s:%d%s",
        settings.ingress_host,
        settings.ingress_port,
        settings.webhook_path if not settings.webhook_path_token else "/webhook/stripe/<token>",
    )
    # run_app stops accepting on SIGTERM/SIGINT and lets in-flight requests finish (shutdown_timeout).
    web.run_app(
        app,
        host=settings.ingress_host,
        port=settings.ingress_port,
        shutdown_timeout=15,
        print=None,
        access_log=None,
        handle_signals=True,
    )
    shutdown_tracing(provider)


if __name__ == "__main__":
    from shared.cli import main

    main(["ingress"])
