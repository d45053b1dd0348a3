"""Confirmed publishing to RabbitMQ over a link that is reopened whenever it ends.

The ingress publishes each webhook (mandatory, one at a time per request); the processor's outbox relay
publishes its batches of domain events. Both wait for the broker's confirm before they answer or commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aio_pika

from shared.amqp import EVENTS_EXCHANGE, declare_topology
from shared.link import ConfirmLink, Endpoint, LinkError

log = logging.getLogger("paybus.amqp.publisher")


class PublishFailed(Exception):
    """The broker did not take responsibility for the message; the sender should retry later."""


def _expire(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(TimeoutError())


class Publisher:
    """Publishes to one exchange with publisher confirms; connects (and reconnects) in the background.

    Each (re)connect first declares the topology with aio-pika on a short-lived connection (or, with
    ``declare=False``, checks passively that the exchange exists), then opens the
    :class:`~shared.link.ConfirmLink` that carries the publishes. When the link ends, publishes
    fail at once (503) and a new one is opened after the URL's ``reconnect_interval`` (default 5 s).
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        exchange: str = EVENTS_EXCHANGE,
        declare: bool = True,
        name: str = "paybus-ingress",
    ) -> None:
        self._url = url
        self._name = name
        self._endpoint = Endpoint.parse(url)
        self._declare = declare
        self._timeout = timeout
        self._exchange_name = exchange
        self._link: ConfirmLink | None = None
        self._connector: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    async def start(self) -> None:
        self._connector = asyncio.create_task(self._connect_forever(), name="amqp-connect")

    async def wait_connected(self, timeout: float) -> bool:  # noqa: ASYNC109 - a convenience for callers
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            return False
        return self.ready

    async def _prepare(self) -> None:
        connection = await aio_pika.connect(
            self._url, client_properties={"connection_name": f"{self._name}-setup"}, timeout=self._timeout
        )
        async with connection:
            channel = await connection.channel()
            if self._declare:
                await declare_topology(channel)
            elif self._exchange_name:
                # a passive declare: no permission needed; fails if the exchange is missing
                await channel.get_exchange(self._exchange_name, ensure=True)

    async def _connect_forever(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._prepare()
                link = await ConfirmLink.open(self._endpoint, name=self._name, timeout=self._timeout)
            except asyncio.CancelledError:
                raise
            except aio_pika.exceptions.ChannelPreconditionFailed as exc:
                # Not an outage: the broker holds a queue or exchange declared with other arguments
                # (an older paybus). The broker's text names it and holds no secret.
                log.error("RabbitMQ topology conflict, see deploy/RUNBOOK.md (topology conflicts): %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            except Exception as exc:  # broker down or refusing: keep trying, /readyz says why
                log.warning("RabbitMQ not reachable (%s); retrying in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._link = link
            self._connected.set()
            log.info("connected to RabbitMQ")
            delay = 0.5
            reason = await link.wait_closed()
            pause = self._endpoint.reconnect_interval
            log.warning("RabbitMQ connection ended (%s); reconnecting in %.1fs", reason, pause)
            await asyncio.sleep(pause)

    @property
    def unready(self) -> str | None:
        """Why a publish would fail now (for /readyz), or None when it would be tried."""
        link = self._link
        if link is None or not link.is_open:
            return "broker connection closed"
        if link.blocked is not None:
            return f"broker blocked publishing ({link.blocked})"
        return None

    @property
    def ready(self) -> bool:
        return self.unready is None

    async def publish(
        self, body: bytes, routing_key: str, *, message_type: str, headers: dict[str, Any]
    ) -> None:
        """Return only once the broker confirmed that a queue holds the message.

        Mandatory, persistent, confirmed; one timeout over write and confirm; a return, a nack, a
        closed or blocked connection and the timeout all raise :class:`PublishFailed`.
        """
        await self.confirmed([self.send(body, routing_key, message_type=message_type, headers=headers)])

    def send(
        self,
        body: bytes,
        routing_key: str,
        *,
        message_type: str,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        timestamp: int | None = None,
        mandatory: bool = True,
    ) -> asyncio.Future[None]:
        """Write one persistent publish now; :meth:`confirmed` waits for its confirm."""
        link = self._link
        if link is None or not link.is_open:
            raise PublishFailed("broker not connected")
        try:
            return link.publish(
                body,
                exchange=self._exchange_name,
                routing_key=routing_key,
                message_type=message_type,
                headers=headers,
                message_id=message_id,
                timestamp=timestamp,
                mandatory=mandatory,
            )
        except (LinkError, ValueError) as exc:
            raise PublishFailed(str(exc)) from exc

    async def confirmed(self, waiters: list[asyncio.Future[None]]) -> None:
        """Wait, at most the timeout, until the broker confirmed every one; else PublishFailed."""
        gathered = asyncio.gather(*waiters)
        timer = asyncio.get_running_loop().call_later(self._timeout, _expire, waiters)
        try:
            await gathered
        except TimeoutError as exc:
            raise PublishFailed(f"no confirm within {self._timeout:g}s") from exc
        except LinkError as exc:
            raise PublishFailed(str(exc)) from exc
        finally:
            timer.cancel()

    async def close(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connector
        if self._link is not None:
            await self._link.close()
