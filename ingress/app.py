"""The ingress aiohttp application factory."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from ingress.publisher import Publisher
from ingress.webhook import make_webhook_view
from shared.config import Settings

PUBLISHER: web.AppKey[Publisher] = web.AppKey("publisher", Publisher)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[PUBLISHER].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready", "reason": "broker channel closed"}, status=503)


def create_app(
    settings: Settings, publisher: Publisher, clock: Callable[[], float] = time.time
) -> web.Application:
    app = web.Application(client_max_size=settings.ingress_max_body)
    app[PUBLISHER] = publisher
    view = make_webhook_view(settings, publisher, clock)
    if settings.webhook_path_token:
        app.router.add_post("/webhook/stripe/{token}", view)  # type: ignore[arg-type]
    else:
        app.router.add_post("/webhook/stripe", view)  # type: ignore[arg-type]
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        await publisher.start()
        yield
        await publisher.close()

    app.cleanup_ctx.append(lifecycle)
    return app
