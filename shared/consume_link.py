"""A lean AMQP 0-9-1 consuming link: one connection, one channel, one consumer, acks written directly.

The processor's event queue delivers thousands of messages a second. Through aio-pika and aiormq each
delivery passed a frame reader task, pamqp objects for three frames, a channel queue, a consumer task
and an `IncomingMessage` whose every attribute is validated on assignment: about an eighth of the
processor's CPU per event (tests/bench/README.md). Here the three frames of a delivery are read where
the bytes arrive (`Basic.Deliver` and the body by hand, the content header by pamqp), the delivery
goes to the consumer's callback as a `Delivery`, and an ack or nack is one frame written at once.

It reuses `shared.link.ConfirmLink` for the rest (login, TLS, heartbeats, broker closes, the end of
the socket), without confirm mode. It does not reconnect: `processor.consumer.LinkSource` opens a new
link when one ends. A cancel from the broker (the queue was deleted) ends the link, so that the
consumer starts again on a new one, as aio-pika's robust queue would.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, Final

from pamqp import commands
from pamqp import frame as wire
from pamqp.header import ContentHeader

from shared.link import (
    _HEAD,
    _METHOD,
    BODY,
    CHANNEL,
    FRAME_END,
    HEADER,
    METHOD,
    ConfirmLink,
    Endpoint,
    LinkClosed,
    LinkError,
)

BASIC_DELIVER: Final = (60, 60)
_TAG_BITS: Final = struct.Struct(">QB")
_ACK_HEAD: Final = _HEAD.pack(METHOD, CHANNEL, 13) + b"\x00\x3c\x00\x50"  # Basic.Ack
_NACK_HEAD: Final = _HEAD.pack(METHOD, CHANNEL, 13) + b"\x00\x3c\x00\x78"  # Basic.Nack


class Delivery:
    """One message delivered to the consumer: what `processor.consumer` reads of aio-pika's
    `IncomingMessage`, with ``ack`` and ``nack`` writing their frame on the link it came by."""

    __slots__ = ("body", "channel", "delivery_tag", "exchange", "properties", "redelivered", "routing_key")

    def __init__(
        self, link: ConsumeLink, delivery_tag: int, redelivered: bool, exchange: str, routing_key: str
    ) -> None:
        self.channel = link  # what acks are grouped by (`processor.acks`): tags count per link
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties: commands.Basic.Properties | None = None
        self.body = b""

    @property
    def headers(self) -> dict[str, Any]:
        return _props(self).headers or {}

    @property
    def content_type(self) -> str | None:
        return _props(self).content_type

    @property
    def content_encoding(self) -> str | None:
        return _props(self).content_encoding

    @property
    def correlation_id(self) -> str | None:
        return _props(self).correlation_id

    @property
    def reply_to(self) -> str | None:
        return _props(self).reply_to

    @property
    def message_id(self) -> str | None:
        return _props(self).message_id

    @property
    def timestamp(self) -> datetime | None:
        return _props(self).timestamp

    @property
    def type(self) -> str | None:
        return _props(self).message_type

    @property
    def app_id(self) -> str | None:
        return _props(self).app_id

    async def ack(self, multiple: bool = False) -> None:
        self.channel.ack(self.delivery_tag, multiple)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self.channel.nack(self.delivery_tag, multiple, requeue)


def _props(delivery: Delivery) -> commands.Basic.Properties:
    assert delivery.properties is not None  # noqa: S101 - a delivery is handed on only with its header
    return delivery.properties


OnDelivery = Callable[[Delivery], Coroutine[Any, Any, None]]


class ConsumeLink(ConfirmLink):
    """One open connection whose channel 1 has a prefetch and at most one consumer."""

    def __init__(self, endpoint: Endpoint, name: str) -> None:
        super().__init__(endpoint, name)
        self._prefetch = 0
        self._callback: OnDelivery | None = None
        self._consumer_tag: str | None = None
        self._delivery: Delivery | None = None  # its header or body frames still to come
        self._remaining = 0
        self._chunks: list[bytes] = []
        self.tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(
        cls,
        endpoint: Endpoint,
        *,
        name: str,
        prefetch: int,
        timeout: float,  # noqa: ASYNC109
    ) -> ConsumeLink:
        link = cls(endpoint, name)
        link._prefetch = prefetch
        await link._connect(timeout)
        return link

    async def _set_up_channel(self) -> None:
        self._send(commands.Basic.Qos(prefetch_count=self._prefetch))
        await self._expect(commands.Basic.QosOk)

    @property
    def is_closed(self) -> bool:
        return not self.is_open

    # ---- consuming

    async def consume(self, queue: str, callback: OnDelivery) -> str:
        """Start the consumer; each delivery runs ``callback`` in a task of its own. Return its tag."""
        if self._closed is not None:
            raise self._closed
        if self._consumer_tag is not None:
            raise RuntimeError("this link already has a consumer")
        self._callback = callback
        self._send(commands.Basic.Consume(queue=queue))
        ok = await self._expect(commands.Basic.ConsumeOk)
        tag = str(ok.consumer_tag)
        self._consumer_tag = tag
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        """Stop deliveries; those already sent still reach the callback, and none is returned."""
        if self._consumer_tag != consumer_tag:
            return
        self._send(commands.Basic.Cancel(consumer_tag=consumer_tag))
        await self._expect(commands.Basic.CancelOk)
        self._consumer_tag = None

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._write_settle(_ACK_HEAD, delivery_tag, 1 if multiple else 0)

    def nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        self._write_settle(_NACK_HEAD, delivery_tag, (1 if multiple else 0) | (2 if requeue else 0))

    def _write_settle(self, head: bytes, delivery_tag: int, bits: int) -> None:
        if self._closed is not None:
            raise self._closed
        assert self._transport is not None  # noqa: S101 - open links have one
        self._transport.write(head + _TAG_BITS.pack(delivery_tag, bits) + FRAME_END)

    # ---- receiving

    def _on_method(self, buffer: bytearray, start: int, end: int) -> None:
        if _METHOD.unpack_from(buffer, start + 7) != BASIC_DELIVER:
            super()._on_method(buffer, start, end)
            return
        at = start + 11
        size = buffer[at]  # the consumer tag: one consumer per link, so not needed
        at += 1 + size
        tag, bits = _TAG_BITS.unpack_from(buffer, at)
        at += 9
        size = buffer[at]
        exchange = bytes(buffer[at + 1 : at + 1 + size]).decode()
        at += 1 + size
        size = buffer[at]
        routing_key = bytes(buffer[at + 1 : at + 1 + size]).decode()
        self._delivery = Delivery(self, tag, bool(bits & 1), exchange, routing_key)

    def _on_content(self, kind: int, buffer: bytearray, start: int, end: int) -> None:
        delivery = self._delivery
        if delivery is None:  # a returned message's content (the link publishes nothing mandatory)
            super()._on_content(kind, buffer, start, end)
            return
        if kind == HEADER:
            _, _, header = wire.unmarshal(bytes(buffer[start : end + 1]))
            assert isinstance(header, ContentHeader)  # noqa: S101 - a header frame unmarshals to one
            delivery.properties = header.properties
            self._remaining = header.body_size
            self._chunks = []
        elif kind == BODY:
            self._chunks.append(bytes(buffer[start + 7 : end]))
            self._remaining -= end - start - 7
        if delivery.properties is not None and self._remaining <= 0:
            delivery.body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            self._delivery, self._chunks = None, []
            self._dispatch(delivery)

    def _dispatch(self, delivery: Delivery) -> None:
        if self._callback is None:
            raise LinkError("a delivery arrived with no consumer")
        task = self._loop.create_task(self._callback(delivery))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _on_other(self, frame: object) -> None:
        if isinstance(frame, commands.Basic.Cancel):  # the queue was deleted, or the node went away
            raise LinkClosed("the broker cancelled the consumer")
        super()._on_other(frame)
