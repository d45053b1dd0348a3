"""Confirmed, mandatory publishing to RabbitMQ over a connection that heals itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, Final

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from pamqp.commands import Basic

from shared.amqp import EVENTS_EXCHANGE, declare_topology

log = logging.getLogger("paybus.ingress.publisher")

PERSISTENT: Final = 2  # AMQP delivery mode


class PublishFailed(Exception):
    """The broker did not take responsibility for the message; the sender should retry later."""


class Publisher:
    """Publishes to one exchange with publisher confirms; connects (and reconnects) in the background."""

    def __init__(
        self, url: str, timeout: float, exchange: str = EVENTS_EXCHANGE, declare: bool = True
    ) -> None:
        self._url = url
        self._declare = declare
        self._timeout = timeout
        self._exchange_name = exchange
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
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

    async def _connect_forever(self) -> None:
        delay = 0.5
        while True:
            try:
                connection = await aio_pika.connect_robust(
                    self._url, client_properties={"connection_name": "paybus-ingress"}, timeout=self._timeout
                )
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                if self._declare:
                    await declare_topology(channel)
                elif self._exchange_name:
                    # a passive declare: no permission needed; fails if the exchange is missing
                    await channel.get_exchange(self._exchange_name, ensure=True)
                self._connection, self._channel = connection, channel
                self._connected.set()
                log.info("connected to RabbitMQ")
                return
            except asyncio.CancelledError:
                raise
            except aio_pika.exceptions.ChannelPreconditionFailed as exc:
                # Not an outage: the broker holds a queue or exchange declared with other arguments
                # (an older paybus). The broker's text names it and holds no secret.
                log.error("RabbitMQ topology conflict, see deploy/RUNBOOK.md (topology conflicts): %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            except Exception as exc:  # broker down or refusing: keep trying, /readyz says why
                log.warning("RabbitMQ not reachable (%s); retrying in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @property
    def ready(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def publish(
        self, body: bytes, routing_key: str, *, message_type: str, headers: dict[str, Any]
    ) -> None:
        """Return only once the broker confirmed that a queue holds the message.

        Straight to aiormq's ``basic_publish`` on the robust channel's current underlying channel:
        aio-pika's ``Message`` and ``Exchange.publish`` rebuild these same properties through a dozen
        attribute hooks per message, a measurable share of the ingress's CPU. Semantics are aio-pika's:
        mandatory, persistent, confirmed, one timeout over write and confirm, a return raises.
        """
        channel = self._channel
        if channel is None or not self.ready:
            raise PublishFailed("broker not connected")
        properties = Basic.Properties(
            content_type="application/json",
            delivery_mode=PERSISTENT,
            message_type=message_type,
            headers=headers,
            # unique per publish: aiormq correlates returns by message id, and Stripe may deliver the
            # same event concurrently
            message_id=os.urandom(16).hex(),
        )
        try:
            underlay = await channel.get_underlay_channel()
            assert isinstance(underlay, aiormq.Channel)  # noqa: S101 - narrows the type for `wait`
            # wait=False: do not hold the channel's lock until the frame is on the socket; the confirm
            # awaited below is the only answer that counts, and it covers the write
            confirmation = await underlay.basic_publish(
                body,
                exchange=self._exchange_name,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                timeout=self._timeout,
                wait=False,
            )
        except Exception as exc:  # timeout, nack, return, closed channel: all mean "not durable"
            raise PublishFailed(exc.__class__.__name__) from exc  # `type` is a parameter here
        if not isinstance(confirmation, Basic.Ack):
            raise PublishFailed(f"broker answered {confirmation.__class__.__name__}")

    async def close(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connector
        if self._connection is not None:
            await self._connection.close()
