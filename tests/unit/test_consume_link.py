"""The processor's consuming link reads deliveries as pamqp marshals them, and writes pamqp's acks.

The broker's frames are marshalled by pamqp (what RabbitMQ's clients are checked against) and fed to
the link's protocol object in pieces of every size; the real broker is in
tests/integration/test_consume_link.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from pamqp import commands
from pamqp import frame as wire
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from shared.consume_link import ConsumeLink, Delivery
from shared.link import Endpoint
from tests.unit.test_link import _frames, _Transport

PROPERTIES = commands.Basic.Properties(
    content_type="application/json",
    delivery_mode=2,
    headers={"stripe-event-id": "evt_1", "received-at": "2026-11-27T07:00:00+00:00", "attempts": 2},
    message_id="m-7",
    timestamp=datetime(2026, 11, 27, 7, 0, tzinfo=UTC),
    message_type="payment_intent.succeeded",
    app_id="paybus-ingress",
    correlation_id="c-1",
    reply_to="replies",
)


def _link() -> tuple[ConsumeLink, _Transport, list[Delivery]]:
    link = ConsumeLink(Endpoint.parse("amqp://localhost/?heartbeat=0"), name="test")
    transport = _Transport()
    link.connection_made(transport)  # type: ignore[arg-type]
    got: list[Delivery] = []

    async def callback(delivery: Delivery) -> None:
        got.append(delivery)

    link._callback = callback
    return link, transport, got


def _delivery(tag: int, body: bytes, *, frame_max: int = 4096, redelivered: bool = False) -> bytes:
    step = frame_max - 8
    return _frames(
        commands.Basic.Deliver(
            consumer_tag="ctag-1",
            delivery_tag=tag,
            redelivered=redelivered,
            exchange="stripe.events",
            routing_key="payment_intent.succeeded",
        ),
        ContentHeader(0, len(body), PROPERTIES),
        *[ContentBody(body[i : i + step]) for i in range(0, len(body), step)],
    )


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.mark.parametrize("piece", [1, 7, 100, 10_000])
async def test_deliveries_arrive_whole_however_the_bytes_are_cut(piece: int) -> None:
    link, _, got = _link()
    bodies = [b'{"id": "evt_1"}', b"x" * 9_000, b""]  # one frame, three body frames, none
    data = b"".join(_delivery(n + 1, body, redelivered=n == 1) for n, body in enumerate(bodies))
    for start in range(0, len(data), piece):
        link.data_received(data[start : start + piece])
    await _settle()

    assert [d.body for d in got] == bodies
    assert [d.delivery_tag for d in got] == [1, 2, 3]
    assert [d.redelivered for d in got] == [False, True, False]
    first = got[0]
    assert (first.exchange, first.routing_key) == ("stripe.events", "payment_intent.succeeded")
    assert first.headers == PROPERTIES.headers
    assert (first.type, first.message_id, first.content_type) == (
        "payment_intent.succeeded",
        "m-7",
        "application/json",
    )
    assert first.timestamp == datetime(2026, 11, 27, 7, 0, tzinfo=UTC)
    assert (first.app_id, first.correlation_id, first.reply_to) == ("paybus-ingress", "c-1", "replies")
    assert first.channel is link
    assert not link.tasks  # every callback's task has ended


@pytest.mark.parametrize(
    ("settle", "expected"),
    [
        (lambda d: d.ack(), commands.Basic.Ack(delivery_tag=5)),
        (lambda d: d.ack(multiple=True), commands.Basic.Ack(delivery_tag=5, multiple=True)),
        (lambda d: d.nack(), commands.Basic.Nack(delivery_tag=5, requeue=True)),
        (lambda d: d.nack(requeue=False), commands.Basic.Nack(delivery_tag=5, requeue=False)),
        (lambda d: d.nack(multiple=True), commands.Basic.Nack(delivery_tag=5, multiple=True, requeue=True)),
    ],
)
async def test_acks_and_nacks_are_the_frames_pamqp_marshals(settle: Any, expected: Any) -> None:
    link, transport, got = _link()
    link.data_received(_delivery(5, b"{}"))
    await _settle()
    await settle(got[0])
    assert transport.written[-1] == wire.marshal(expected, 1)


async def test_a_cancel_from_the_broker_ends_the_link_and_acks_then_fail() -> None:
    link, transport, got = _link()
    link.data_received(_delivery(1, b"{}"))
    await _settle()
    link.data_received(_frames(commands.Basic.Cancel(consumer_tag="ctag-1")))

    assert "cancelled the consumer" in str(await link.wait_closed())
    assert link.is_closed and transport.closed
    with pytest.raises(Exception, match="cancelled the consumer"):
        await got[0].ack()


async def test_a_channel_close_ends_the_link_and_answers_close_ok() -> None:
    link, transport, _ = _link()
    link.data_received(
        _frames(
            commands.Channel.Close(
                reply_code=404, reply_text="NOT_FOUND - no queue", class_id=60, method_id=20
            )
        )
    )
    assert "404" in str(await link.wait_closed())
    assert wire.marshal(commands.Channel.CloseOk(), 1) in transport.written


async def test_content_without_a_delivery_is_not_taken_for_one() -> None:
    link, _, got = _link()
    link.data_received(_frames(ContentHeader(0, 2, PROPERTIES), ContentBody(b"{}")))
    link.data_received(_delivery(1, b"[]"))
    await _settle()
    assert [d.body for d in got] == [b"[]"]
    assert link.is_open
