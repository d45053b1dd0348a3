"""The ingress aiohttp application factory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingress.webhook import make_webhook_view
from shared.config import Settings
from shared.publisher import Publisher
from shared.telemetry import IngressMetrics

PUBLISHER: web.AppKey[Publisher] = web.AppKey("publisher", Publisher)
METRICS: web.AppKey[IngressMetrics] = web.AppKey("metrics", IngressMetrics)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    reason = request.app[PUBLISHER].unready
    if reason is None:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready", "reason": reason}, status=503)


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(
    settings: Settings,
    publisher: Publisher,
    clock: Callable[[], float] = time.time,
    metrics: IngressMetrics | None = None,
    tracer: trace.Tracer | None = None,
) -> web.Application:
    app = web.Application(client_max_size=settings.ingress_max_body)
    app[PUBLISHER] = publisher
    app[METRICS] = metrics = metrics or IngressMetrics()
    view = make_webhook_view(
        settings, publisher, metrics, tracer or trace.get_tracer("paybus.ingress"), clock
    )
    if settings.webhook_path_token:
        app.router.add_post("/webhook/stripe/{token}", view)
    else:
        app.router.add_post("/webhook/stripe", view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await publisher.start()
        yield
        await publisher.close()

    app.cleanup_ctx.append(lifecycle)
    return app
