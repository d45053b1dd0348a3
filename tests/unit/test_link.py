"""The ingress's publishing link: its hand-written frames are pamqp's bytes, and it reads the broker right.

The frame tests compare against pamqp, the library aiormq and aio-pika marshal with. The reading tests
feed the broker's frames (marshalled by pamqp) to the link's protocol object and look at its waiters and
at what it wrote back; the real broker is in tests/integration/test_link.py.
"""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime
from typing import Any

import pytest
from pamqp import commands
from pamqp import frame as wire
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from shared.link import (
    HEARTBEAT_FRAME,
    ConfirmLink,
    Endpoint,
    LinkClosed,
    LinkError,
    Nacked,
    Returned,
    encode_publish,
)

FRAME_MAX = 4096


def _pamqp_publish(body: bytes, headers: dict[str, Any], frame_max: int = FRAME_MAX) -> bytes:
    properties = commands.Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        headers=headers,
        message_id="m-1",
        message_type="payment_intent.succeeded",
    )
    frames: list[Any] = [
        commands.Basic.Publish(
            exchange="stripe.events", routing_key="payment_intent.succeeded", mandatory=True
        ),
        ContentHeader(0, len(body), properties),
    ]
    step = frame_max - 8
    frames += [ContentBody(body[i : i + step]) for i in range(0, len(body), step)]
    return b"".join(wire.marshal(f, 1) for f in frames)


def _ours(body: bytes, headers: dict[str, Any], frame_max: int = FRAME_MAX) -> bytes:
    return encode_publish(
        body,
        exchange="stripe.events",
        routing_key="payment_intent.succeeded",
        content_type="application/json",
        delivery_mode=2,
        headers=headers,
        message_id="m-1",
        message_type="payment_intent.succeeded",
        frame_max=frame_max,
    )


INGRESS_HEADERS = {
    "stripe-event-id": "evt_3MtwBwLkdIwHu7ix28a3tqPa",
    "livemode": False,
    "received-at": "2026-11-27T05:00:00.123456+00:00",
    "stripe-account": "acct_1032D82eZvKYlo2C",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
}


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b'{"id":"evt_1","object":"event"}', INGRESS_HEADERS),
        (b"x" * (FRAME_MAX - 8), INGRESS_HEADERS),  # exactly one full body frame
        (b"y" * (3 * FRAME_MAX + 17), INGRESS_HEADERS),  # split over four body frames
        (b"", INGRESS_HEADERS),  # no body frame at all
        (b"{}", {"livemode": True, "note": "caf\u00e9 \u20b9"}),  # true, and non-ASCII text
        (b"{}", {}),
        (b"{}", {"count": 3, "nothing": None, "nested": {"a": 1}}),  # not str/bool: pamqp's encoder
    ],
    ids=["event", "one-full-frame", "four-frames", "empty", "unicode", "no-headers", "other-types"],
)
def test_a_publish_is_byte_for_byte_what_pamqp_marshals(body: bytes, headers: dict[str, Any]) -> None:
    assert _ours(body, headers) == _pamqp_publish(body, headers)


def test_an_outbox_publish_is_byte_for_byte_what_pamqp_marshals() -> None:
    # the relay's: its own message id, a timestamp, no headers, not mandatory
    body = b'{"id":"9b2c6f3e-0000-4000-8000-000000000001","type":"payment.succeeded"}'
    properties = commands.Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id="9b2c6f3e-0000-4000-8000-000000000001",
        timestamp=datetime.fromtimestamp(1_795_000_000, UTC),
        message_type="payment.succeeded",
    )
    expected = b"".join(
        wire.marshal(f, 1)
        for f in (
            commands.Basic.Publish(exchange="paybus.events", routing_key="payment.succeeded"),
            ContentHeader(0, len(body), properties),
            ContentBody(body),
        )
    )
    assert expected == encode_publish(
        body,
        exchange="paybus.events",
        routing_key="payment.succeeded",
        content_type="application/json",
        delivery_mode=2,
        message_id="9b2c6f3e-0000-4000-8000-000000000001",
        message_type="payment.succeeded",
        timestamp=1_795_000_000,
        mandatory=False,
        frame_max=FRAME_MAX,
    )


def test_names_longer_than_a_short_string_are_refused() -> None:
    with pytest.raises(ValueError, match="255"):
        encode_publish(
            b"{}",
            exchange="x",
            routing_key="r" * 256,
            content_type="application/json",
            delivery_mode=2,
            headers={},
            message_id="m",
            message_type="t",
            frame_max=FRAME_MAX,
        )


def test_endpoint_reads_the_url_as_aiormq_does() -> None:
    plain = Endpoint.parse("amqp://u:p%40ss@rabbit.internal/paybus?heartbeat=10&reconnect_interval=0.2")
    assert (plain.host, plain.port, plain.vhost, plain.username, plain.password) == (
        "rabbit.internal",
        5672,
        "paybus",
        "u",
        "p@ss",
    )
    assert (plain.heartbeat, plain.reconnect_interval, plain.tls, plain.external_auth) == (
        10,
        0.2,
        None,
        False,
    )
    assert "p@ss" not in repr(plain)  # an endpoint in a log line shows no password
    assert Endpoint.parse("amqp://localhost/").vhost == "/"
    assert Endpoint.parse("amqp://localhost").vhost == "/"
    assert Endpoint.parse("amqp://localhost/%2F").vhost == "/"
    defaults = Endpoint.parse("amqp://localhost")
    assert (defaults.username, defaults.password, defaults.heartbeat, defaults.reconnect_interval) == (
        "guest",
        "guest",
        60,
        5.0,
    )
    secure = Endpoint.parse("amqps://rabbit.internal:5671/?no_verify_ssl=1&auth=external")
    assert isinstance(secure.tls, ssl.SSLContext)
    assert secure.tls.verify_mode == ssl.CERT_NONE
    assert secure.external_auth
    verified = Endpoint.parse("amqps://rabbit.internal/")
    assert verified.port == 5671
    assert verified.tls is not None and verified.tls.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ValueError, match="amqp://"):
        Endpoint.parse("http://rabbit.internal/")


class _Transport:
    """Records what the link writes; stands in for the socket, not for the broker."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def _open_link() -> tuple[ConfirmLink, _Transport]:
    link = ConfirmLink(Endpoint.parse("amqp://localhost/?heartbeat=0"), name="test")
    transport = _Transport()
    link.connection_made(transport)  # type: ignore[arg-type]
    return link, transport


def _publish(link: ConfirmLink) -> asyncio.Future[None]:
    return link.publish(b"{}", exchange="stripe.events", routing_key="a.b", message_type="a.b", headers={})


def _frames(*frames: Any, channel: int = 1) -> bytes:
    return b"".join(wire.marshal(f, channel) for f in frames)


async def test_acks_settle_their_waiters_even_when_the_frame_arrives_in_pieces() -> None:
    link, _ = _open_link()
    first, second, third = _publish(link), _publish(link), _publish(link)
    data = _frames(commands.Basic.Ack(delivery_tag=2, multiple=True)) + HEARTBEAT_FRAME
    link.data_received(data[:5])
    assert not first.done()
    link.data_received(data[5:])
    assert first.done() and second.done() and not third.done()
    assert first.result() is None and second.result() is None
    link.data_received(_frames(commands.Basic.Nack(delivery_tag=3)))
    with pytest.raises(Nacked):
        third.result()


async def test_a_returned_message_fails_its_waiter_and_only_its_waiter() -> None:
    link, transport = _open_link()
    kept, returned = _publish(link), _publish(link)
    # the broker's return names the message by the message id the link wrote in its header
    written = wire.unmarshal(transport.written[1][transport.written[1].index(b"\xce") + 1 :])[2]
    assert isinstance(written, ContentHeader)
    returned_id = written.properties.message_id
    assert returned_id is not None and returned_id.endswith("-2")
    header = ContentHeader(0, 6, commands.Basic.Properties(message_id=returned_id))
    data = _frames(
        commands.Basic.Return(
            reply_code=312, reply_text="NO_ROUTE", exchange="stripe.events", routing_key="a.b"
        ),
        header,
        ContentBody(b"{}{"),
        ContentBody(b"}}}"),
        commands.Basic.Ack(delivery_tag=2, multiple=True),
    )
    for i in range(0, len(data), 7):  # in small pieces, as a slow socket might deliver them
        link.data_received(data[i : i + 7])
    assert kept.result() is None
    with pytest.raises(Returned):
        returned.result()
    assert link.is_open
    assert _publish(link) is not None  # the channel goes on


async def test_a_mandatory_publish_keeps_the_links_own_message_id() -> None:
    link, _ = _open_link()
    with pytest.raises(ValueError, match="message id"):
        link.publish(b"{}", exchange="x", routing_key="a.b", message_type="a.b", message_id="evt_1")


async def test_blocked_refuses_publishes_until_unblocked() -> None:
    link, _ = _open_link()
    link.data_received(_frames(commands.Connection.Blocked(reason="low on memory"), channel=0))
    with pytest.raises(LinkError, match="low on memory"):
        _publish(link)
    link.data_received(_frames(commands.Connection.Unblocked(), channel=0))
    assert not _publish(link).done()


async def test_a_channel_close_fails_every_waiter_and_answers_close_ok() -> None:
    link, transport = _open_link()
    waiters = [_publish(link) for _ in range(3)]
    link.data_received(
        _frames(
            commands.Channel.Close(
                reply_code=404,
                reply_text="NOT_FOUND - no exchange 'stripe.events'",
                class_id=60,
                method_id=40,
            )
        )
    )
    for waiter in waiters:
        with pytest.raises(LinkClosed, match="404"):
            waiter.result()
    assert isinstance(wire.unmarshal(transport.written[-1])[2], commands.Channel.CloseOk)
    assert transport.closed and not link.is_open
    assert "404" in str(await link.wait_closed())
    with pytest.raises(LinkClosed):
        _publish(link)


async def test_a_malformed_frame_ends_the_link() -> None:
    link, transport = _open_link()
    waiter = _publish(link)
    bad = bytearray(_frames(commands.Basic.Ack(delivery_tag=1)))
    bad[-1] = 0x00
    link.data_received(bytes(bad))
    with pytest.raises(LinkClosed, match="malformed"):
        waiter.result()
    assert transport.closed


async def test_a_lost_socket_fails_every_waiter() -> None:
    link, _ = _open_link()
    waiter = _publish(link)
    link.connection_lost(ConnectionResetError())
    with pytest.raises(LinkClosed, match="ConnectionResetError"):
        waiter.result()
