"""Ceiling: the barest aiohttp POST handler (read the body, answer JSON; no verify, no publish).

Run as `python -m tests.bench.bare PORT`; it serves until SIGTERM. One process, the default event loop:
the gap between this and one ingress process is the ingress's own work (verify, decode, publish, log).
"""

from __future__ import annotations

import sys

from aiohttp import web


async def webhook(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"received": True, "id": "evt_bare"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/webhook/stripe", webhook)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
