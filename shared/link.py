"""A lean AMQP 0-9-1 publishing link: one connection, one channel in confirm mode, publishes only.

The ingress publishes one message per request and waits for its confirm; the processor's outbox relay
publishes a batch of domain events and waits for all their confirms. Through aio-pika and aiormq that
cost about a third of the ingress's CPU per webhook: every publish built pamqp objects for three frames and
passed a lock, a timeout scope, a write queue and a writer task; every confirm passed a reader task,
a channel queue and a second reader task. Here a publish is its frames joined into one ``bytes`` and
one transport write, and a confirm is parsed in ``data_received`` and settles its waiters there.

What a publishing client needs is all here: PLAIN or EXTERNAL login, TLS (``amqps://`` with aiormq's
``cafile``/``capath``/``cadata``/``certfile``/``keyfile``/``no_verify_ssl`` query options), the
``heartbeat`` option (default 60 s, as aiormq), mandatory publishes whose returns fail their waiter,
``connection.blocked``, broker-initiated closes and the end of the socket. It does not reconnect:
the :class:`shared.publisher.Publisher` opens a new link when one ends. The handshake and the rare
frames are pamqp's, as in aiormq; only a publish and an ack or nack take the hand-written path, and
``tests/unit/test_link.py`` holds that path to pamqp's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import struct
from base64 import b64decode
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

from pamqp import commands
from pamqp import frame as wire
from pamqp.encode import field_table
from pamqp.header import ContentHeader, ProtocolHeader
from yarl import URL

log = logging.getLogger("paybus.amqp.link")

T = TypeVar("T")

CHANNEL: Final = 1
FRAME_END: Final = b"\xce"
_HEAD: Final = struct.Struct(">BHI")  # frame type, channel, payload size
_METHOD: Final = struct.Struct(">HH")  # class id, method id
_CONFIRM: Final = struct.Struct(">QB")  # delivery tag, bits
_SIZE: Final = struct.Struct(">I")
_CONTENT: Final = struct.Struct(">HHQH")  # class id, weight, body size, property flags
HEARTBEAT_FRAME: Final = b"\x08\x00\x00\x00\x00\x00\x00\xce"
METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8
BASIC_ACK: Final = (60, 80)
BASIC_NACK: Final = (60, 120)
# Basic property flags, in the order the spec lists (and a header frame carries) the properties.
F_CONTENT_TYPE, F_HEADERS, F_DELIVERY_MODE, F_MESSAGE_ID, F_TIMESTAMP, F_TYPE = (
    0x8000,
    0x2000,
    0x1000,
    0x0080,
    0x0040,
    0x0020,
)
_TIMESTAMP: Final = struct.Struct(">Q")
DEFAULT_PORTS: Final = {"amqp": 5672, "amqps": 5671}


class LinkError(Exception):
    """The broker did not take the message; the text says why and holds no secret."""


class LinkClosed(LinkError):
    pass


class Returned(LinkError):
    """The broker confirmed a mandatory publish that no queue took."""


class Nacked(LinkError):
    pass


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect, read off an ``amqp://`` or ``amqps://`` URL as aiormq reads it."""

    host: str
    port: int
    vhost: str
    username: str
    password: str = field(repr=False)  # never in a log line, should the endpoint be printed
    heartbeat: int
    reconnect_interval: float
    external_auth: bool
    tls: ssl.SSLContext | None

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parsed = URL(url)
        if parsed.scheme not in DEFAULT_PORTS:
            raise ValueError("AMQP URL must start with amqp:// or amqps://")
        query = parsed.query
        path = parsed.path
        tls = None
        if parsed.scheme == "amqps":
            cadata = query.get("cadata")
            tls = ssl.create_default_context(
                cafile=query.get("cafile"),
                capath=query.get("capath"),
                cadata=b64decode(cadata).decode("ascii") if cadata else None,
            )
            if query.get("certfile"):
                tls.load_cert_chain(query["certfile"], query.get("keyfile"))
            if query.get("no_verify_ssl", "0") != "0":
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        return cls(
            host=parsed.host or "localhost",
            port=parsed.port or DEFAULT_PORTS[parsed.scheme],
            vhost="/" if path in {"", "/"} else path[1:].replace("%2F", "/"),
            username=parsed.user or "guest",
            password=parsed.password or "guest",
            heartbeat=int(query.get("heartbeat", "60")),
            reconnect_interval=float(query.get("reconnect_interval", "5")),
            external_auth=query.get("auth", "plain").lower() == "external",
            tls=tls,
        )


def shortstr(value: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise ValueError("AMQP short string longer than 255 bytes")
    return bytes((len(data),)) + data


def table(values: Mapping[str, Any]) -> bytes:
    """An AMQP field table as pamqp encodes it (keys sorted); strings and booleans, all the ingress
    sends, by hand, and anything else by pamqp."""
    parts = []
    for key, value in sorted(values.items()):
        kind = type(value)
        if len(key) > 128:  # pamqp truncates such keys
            return bytes(field_table(dict(values)))
        if kind is str:
            data = value.encode()
            parts.append(shortstr(key) + b"S" + _SIZE.pack(len(data)) + data)
        elif kind is bool:
            parts.append(shortstr(key) + (b"t\x01" if value else b"t\x00"))
        else:
            return bytes(field_table(dict(values)))
    data = b"".join(parts)
    return _SIZE.pack(len(data)) + data


def encode_publish(
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    content_type: str,
    delivery_mode: int,
    message_id: str,
    message_type: str,
    frame_max: int,
    headers: Mapping[str, Any] | None = None,
    timestamp: int | None = None,
    mandatory: bool = True,
    channel: int = CHANNEL,
) -> bytes:
    """Basic.Publish, its content header and its body frames, as one buffer.

    The properties are content-type, headers (when given), delivery-mode, message-id, timestamp (when
    given, in seconds) and type: what paybus sends, no more.
    """
    method = (
        b"\x00\x3c\x00\x28\x00\x00"
        + shortstr(exchange)
        + shortstr(routing_key)
        + (b"\x01" if mandatory else b"\x00")
    )
    flags = F_CONTENT_TYPE | F_DELIVERY_MODE | F_MESSAGE_ID | F_TYPE
    props = [shortstr(content_type)]
    if headers is not None:
        flags |= F_HEADERS
        props.append(table(headers))
    props += [bytes((delivery_mode,)), shortstr(message_id)]
    if timestamp is not None:
        flags |= F_TIMESTAMP
        props.append(_TIMESTAMP.pack(timestamp))
    props.append(shortstr(message_type))
    header = _CONTENT.pack(60, 0, len(body), flags) + b"".join(props)
    parts = [_HEAD.pack(METHOD, channel, len(method)), method, FRAME_END]
    parts += [_HEAD.pack(HEADER, channel, len(header)), header, FRAME_END]
    step = frame_max - 8  # a frame's own bytes: 7 of head, 1 of end
    for start in range(0, len(body), step):
        chunk = body[start : start + step]
        parts += [_HEAD.pack(BODY, channel, len(chunk)), chunk, FRAME_END]
    return b"".join(parts)


class ConfirmLink(asyncio.Protocol):
    """One open connection with channel 1 in confirm mode. :meth:`open` makes one."""

    def __init__(self, endpoint: Endpoint, name: str) -> None:
        self._endpoint = endpoint
        self._name = name
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[object] | None = None  # the handshake's next method frame
        self._pending: OrderedDict[int, asyncio.Future[None]] = OrderedDict()
        self._returned: set[int] = set()
        self._returning: tuple[int, int] | None = None  # (delivery tag or -1, body bytes still to come)
        self._tag = 0
        self._id_prefix = os.urandom(8).hex() + "-"
        self._frame_max = 131072
        self._closed: LinkError | None = None
        self._done: asyncio.Future[LinkError] = self._loop.create_future()
        self._last_received = self._loop.time()
        self._beat: asyncio.TimerHandle | None = None
        self.blocked: str | None = None

    # ---- opening and closing

    @classmethod
    async def open(cls, endpoint: Endpoint, *, name: str, timeout: float) -> ConfirmLink:  # noqa: ASYNC109
        link = cls(endpoint, name)
        await link._connect(timeout)
        return link

    async def _connect(self, timeout: float) -> None:  # noqa: ASYNC109
        endpoint = self._endpoint
        async with asyncio.timeout(timeout):
            await self._loop.create_connection(
                lambda: self,
                endpoint.host,
                endpoint.port,
                ssl=endpoint.tls,
                server_hostname=endpoint.host if endpoint.tls else None,
            )
            try:
                await self._handshake()
            except BaseException:
                self._abort(LinkClosed("handshake failed"))
                raise

    async def _handshake(self) -> None:
        transport = self._transport
        assert transport is not None  # noqa: S101 - set by connection_made before create_connection returns
        transport.write(ProtocolHeader().marshal())
        await self._expect(commands.Connection.Start)
        if self._endpoint.external_auth:
            mechanism, response = "EXTERNAL", ""
        else:
            mechanism, response = "PLAIN", f"\0{self._endpoint.username}\0{self._endpoint.password}"
        self._send(
            commands.Connection.StartOk(
                client_properties={
                    "connection_name": self._name,
                    "product": "paybus",
                    "capabilities": {
                        "publisher_confirms": True,
                        "connection.blocked": True,
                        "authentication_failure_close": True,
                        "consumer_cancel_notify": True,  # a consuming link hears of a deleted queue
                    },
                },
                mechanism=mechanism,
                response=response,
                locale="en_US",
            ),
            channel=0,
        )
        tune = await self._expect(commands.Connection.Tune)
        self._frame_max = tune.frame_max or self._frame_max
        heartbeat = self._endpoint.heartbeat
        self._send(
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=self._frame_max, heartbeat=heartbeat
            ),
            channel=0,
        )
        self._send(commands.Connection.Open(virtual_host=self._endpoint.vhost), channel=0)
        await self._expect(commands.Connection.OpenOk)
        self._send(commands.Channel.Open())
        await self._expect(commands.Channel.OpenOk)
        await self._set_up_channel()
        if heartbeat > 0:
            self._beat_later()

    async def _set_up_channel(self) -> None:
        self._send(commands.Confirm.Select())
        await self._expect(commands.Confirm.SelectOk)

    async def _expect(self, kind: type[T]) -> T:
        self._waiter = self._loop.create_future()
        try:
            got = await self._waiter
        finally:
            self._waiter = None
        if not isinstance(got, kind):
            raise LinkClosed(f"unexpected {type(got).__name__} while opening the connection")
        return got

    async def close(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109
        """Close politely (Connection.Close, then CloseOk or ``timeout``); waiters fail as closed."""
        if self._closed is not None:
            return
        with contextlib.suppress(Exception):
            self._send(commands.Connection.Close(reply_code=200, reply_text="shutdown"), channel=0)
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._done)
        self._abort(LinkClosed("closed by paybus"))

    async def wait_closed(self) -> LinkError:
        """Return why the link ended, once it has."""
        return await asyncio.shield(self._done)

    @property
    def is_open(self) -> bool:
        return self._closed is None

    def _abort(self, reason: LinkError) -> None:
        if self._closed is None:
            self._closed = reason
            if self._beat is not None:
                self._beat.cancel()
            pending, self._pending = self._pending, OrderedDict()
            for waiter in pending.values():
                if not waiter.done():
                    waiter.set_exception(reason)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(reason)
            if not self._done.done():
                self._done.set_result(reason)
        if self._transport is not None:
            self._transport.close()

    def _beat_later(self) -> None:
        """Send a heartbeat in half the negotiated interval (and check the broker's) from now."""
        self._beat = self._loop.call_later(max(self._endpoint.heartbeat / 2, 0.5), self._heartbeat)

    def _heartbeat(self) -> None:
        # aiormq's grace: three intervals with nothing received means the peer is gone
        if self._loop.time() - self._last_received > 3 * self._endpoint.heartbeat:
            self._abort(LinkClosed("no heartbeat from the broker"))
            if self._transport is not None:
                self._transport.abort()
            return
        if self._transport is not None:
            self._transport.write(HEARTBEAT_FRAME)
        self._beat_later()

    # ---- publishing

    def publish(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        message_type: str,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        timestamp: int | None = None,
        mandatory: bool = True,
        content_type: str = "application/json",
        delivery_mode: int = 2,
    ) -> asyncio.Future[None]:
        """Write a publish; the future is done when the broker confirmed it or cannot.

        A mandatory publish gets a message id made by the link: a return names its message only by
        message id, and these are unique per publish (Stripe may deliver the same event concurrently,
        so the event id would not do). Others may carry their own (the outbox row id).
        """
        if self._closed is not None:
            raise self._closed
        if self.blocked is not None:
            raise LinkError(f"broker blocked publishing ({self.blocked})")
        if mandatory and message_id is not None:
            raise ValueError("a mandatory publish carries the link's own message id")
        tag = self._tag + 1
        data = encode_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            content_type=content_type,
            delivery_mode=delivery_mode,
            headers=headers,
            message_id=self._id_prefix + str(tag) if message_id is None else message_id,
            message_type=message_type,
            timestamp=timestamp,
            mandatory=mandatory,
            frame_max=self._frame_max,
        )
        assert self._transport is not None  # noqa: S101 - open links have one
        self._tag = tag
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._pending[tag] = waiter
        self._transport.write(data)
        return waiter

    def _send(self, method: Any, channel: int = CHANNEL) -> None:
        if self._transport is None or self._transport.is_closing():
            raise LinkClosed("connection closed")
        self._transport.write(wire.marshal(method, channel))

    # ---- receiving

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream connection (uvloop's transports do not subclass asyncio's)
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._abort(LinkClosed(f"connection lost ({type(exc).__name__})" if exc else "connection closed"))

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        buffer = self._buffer
        buffer += data
        start, size = 0, len(buffer)
        try:
            while size - start >= 8:
                kind, channel, length = _HEAD.unpack_from(buffer, start)
                end = start + 7 + length
                if end >= size:
                    break
                if buffer[end] != 0xCE:
                    raise LinkClosed("malformed frame from the broker")
                if kind == METHOD:
                    self._on_method(buffer, start, end)
                elif kind in (HEADER, BODY):
                    self._on_content(kind, buffer, start, end)
                start = end + 1  # heartbeats need nothing beyond the time noted above
        except LinkError as exc:
            self._abort(exc)
            return
        del buffer[:start]

    def _on_method(self, buffer: bytearray, start: int, end: int) -> None:
        method = _METHOD.unpack_from(buffer, start + 7)
        if method in (BASIC_ACK, BASIC_NACK):
            tag, bits = _CONFIRM.unpack_from(buffer, start + 11)
            self._settle(tag, bits & 1, None if method == BASIC_ACK else Nacked("broker answered Nack"))
            return
        self._on_rare_method(buffer, start, end)

    def _on_rare_method(self, buffer: bytearray, start: int, end: int) -> None:
        _, channel, frame = wire.unmarshal(bytes(buffer[start : end + 1]))
        if isinstance(frame, commands.Channel.Close):  # whatever was asked: the reason is the broker's
            self._send(commands.Channel.CloseOk(), channel=channel)
            raise LinkClosed(f"broker closed the channel: {frame.reply_code} {frame.reply_text}")
        if self._waiter is not None and not self._waiter.done():
            if isinstance(frame, commands.Connection.Close):
                self._send(commands.Connection.CloseOk(), channel=0)
                raise LinkClosed(f"broker refused the connection: {frame.reply_code} {frame.reply_text}")
            self._waiter.set_result(frame)
            return
        match frame:
            case commands.Basic.Return():
                self._returning = (-1, 0)
            case commands.Connection.Blocked():
                self.blocked = frame.reason or "blocked"
                log.warning("RabbitMQ blocked publishing: %s", self.blocked)
            case commands.Connection.Unblocked():
                self.blocked = None
                log.info("RabbitMQ unblocked publishing")
            case commands.Connection.Close():
                self._send(commands.Connection.CloseOk(), channel=0)
                raise LinkClosed(f"broker closed the connection: {frame.reply_code} {frame.reply_text}")
            case commands.Connection.CloseOk():
                raise LinkClosed("closed by paybus")
            case _:
                self._on_other(frame)

    def _on_other(self, frame: object) -> None:
        log.debug("ignored %s from the broker", type(frame).__name__)

    def _on_content(self, kind: int, buffer: bytearray, start: int, end: int) -> None:
        """The header and body of a returned message: only its message id matters, to fail its waiter."""
        if self._returning is None:
            return
        if kind == HEADER:
            _, _, header = wire.unmarshal(bytes(buffer[start : end + 1]))
            assert isinstance(header, ContentHeader)  # noqa: S101 - a header frame unmarshals to one
            message_id = header.properties.message_id or ""
            tag = -1
            if message_id.startswith(self._id_prefix):
                tag = int(message_id[len(self._id_prefix) :])
                self._returned.add(tag)
            self._returning = (tag, header.body_size)
        else:
            tag, remaining = self._returning
            self._returning = (tag, remaining - (end - start - 7))
        if self._returning[1] <= 0:
            self._returning = None

    def _settle(self, tag: int, multiple: int, error: LinkError | None) -> None:
        pending = self._pending
        if not multiple:
            waiter = pending.pop(tag, None)
            if waiter is not None:
                self._resolve(tag, waiter, error)
            return
        while pending:
            first = next(iter(pending))
            if first > tag:
                break
            self._resolve(first, pending.pop(first), error)

    def _resolve(self, tag: int, waiter: asyncio.Future[None], error: LinkError | None) -> None:
        if tag in self._returned:
            self._returned.discard(tag)
            error = Returned("broker returned the message: no queue is bound for it")
        if waiter.done():  # timed out or cancelled before the broker answered
            return
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)
