"""The webhook view: token, signature, envelope, confirmed publish, then 200. Nothing else."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web

from ingress.publisher import Publisher, PublishFailed
from ingress.signature import BadSignature, verify
from shared.config import Settings
from shared.envelope import H_ACCOUNT, H_EVENT_ID, H_LIVEMODE, H_RECEIVED_AT, NotAnEvent, decode_envelope

log = logging.getLogger("paybus.ingress")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def make_webhook_view(
    settings: Settings, publisher: Publisher, clock: Callable[[], float] = time.time
) -> Callable[[web.Request], object]:
    token = settings.webhook_path_token.encode()

    async def webhook(request: web.Request) -> web.Response:
        if token and not hmac.compare_digest(request.match_info.get("token", "").encode(), token):
            raise web.HTTPNotFound()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            log.info("webhook rejected: body over %d bytes", settings.ingress_max_body)
            return _error(413, f"body larger than {settings.ingress_max_body} bytes")
        try:
            verify(body, request.headers.get("Stripe-Signature"), settings.webhook_secrets, now=clock())
        except BadSignature as exc:
            log.info("webhook rejected: %s", exc)
            return _error(400, str(exc))
        try:
            env = decode_envelope(body)
        except NotAnEvent as exc:
            log.info("webhook rejected: body is not a Stripe event")
            return _error(400, str(exc).split("\n", 1)[0][:200])
        if env.livemode != settings.stripe_livemode:
            log.info(
                "webhook rejected: livemode mismatch", extra={"event_id": env.id, "event_type": env.type}
            )
            return _error(400, "livemode does not match this endpoint")
        headers: dict[str, object] = {
            H_EVENT_ID: env.id,
            H_LIVEMODE: env.livemode,
            H_RECEIVED_AT: datetime.now(UTC).isoformat(),
        }
        if env.account:
            headers[H_ACCOUNT] = env.account
        try:
            await publisher.publish(body, routing_key=env.type, message_type=env.type, headers=headers)
        except PublishFailed as exc:
            log.warning(
                "webhook not accepted: publish failed (%s)",
                exc,
                extra={"event_id": env.id, "event_type": env.type},
            )
            return _error(503, "event bus unavailable; retry later")
        log.info("webhook accepted", extra={"event_id": env.id, "event_type": env.type})
        return web.json_response({"received": True, "id": env.id})

    return webhook
