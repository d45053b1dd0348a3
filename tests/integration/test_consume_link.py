"""The event consumer over its own link (`shared.consume_link`), against the real broker.

Every message once, acks in runs, and each way the link can end: an operator closing the connection
(the messages in hand come back and the consumer goes on, on a new link) and a deleted queue.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest

from processor.consumer import Consumer, Forwarder, LinkSource
from shared.amqp import declare_topology, topology
from shared.consume_link import ConsumeLink, Delivery
from shared.link import Endpoint
from tests.proxy import TcpProxy
from tests.support import queue_depth, rabbitmqctl, wait_for

QUEUE = "paybus.test.consume-link"


@pytest.fixture
async def amqp(make_vhost: Callable[[], str]) -> str:
    url = make_vhost()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel, topology((1000,)))
        await channel.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    return url


async def _publish(amqp: str, count: int, body_size: int = 0) -> None:
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for n in range(count):
            body = json.dumps({"n": n, "pad": "x" * body_size}).encode()
            await channel.default_exchange.publish(
                aio_pika.Message(body, headers={"stripe-event-id": f"evt_{n}"}, type="t", message_id=f"m{n}"),
                routing_key=QUEUE,
            )


@pytest.fixture
async def forwarder(amqp: str) -> AsyncIterator[Forwarder]:
    connection = await aio_pika.connect_robust(amqp)
    channel = await connection.channel(publisher_confirms=True)
    forwarder = Forwarder(channel, QUEUE, (1000,))
    await forwarder.open()
    yield forwarder
    await connection.close()


async def _database_up() -> None:
    return None


async def test_every_message_is_taken_once_with_its_properties_and_acked_in_runs(
    amqp: str, forwarder: Forwarder
) -> None:
    await _publish(amqp, 600, body_size=200_000 // 600)
    await _publish(amqp, 1, body_size=300_000)  # a body of several frames
    seen: list[tuple[int, str, str | None, str | None]] = []

    async def work(message: Delivery) -> None:
        n = json.loads(message.body)["n"]
        seen.append((n, message.headers["stripe-event-id"], message.type, message.message_id))
        await asyncio.sleep(0)

    source = LinkSource(amqp, QUEUE, prefetch=64, name="paybus-test-consumer")
    consumer = Consumer(source, QUEUE, work, forwarder, _database_up, 64, coalesce_acks=True)
    running = asyncio.create_task(consumer.run())
    try:
        await wait_for(lambda: _acked(consumer, 601), timeout=30)
    finally:
        await consumer.stop()
        running.cancel()
        await source.close()
    assert sorted(n for n, *_ in seen) == sorted([*range(600), 0])
    assert all(evt == f"evt_{n}" and kind == "t" and mid == f"m{n}" for n, evt, kind, mid in seen)
    assert consumer.acks is not None and consumer.acks.frames < 601 / 4  # runs, not one frame each
    assert await queue_depth(amqp, QUEUE) == 0


async def _acked(consumer: Consumer, count: int) -> bool:
    return consumer.acks is not None and consumer.acks.acked >= count


async def test_messages_in_hand_come_back_when_an_operator_closes_the_link(
    amqp: str, forwarder: Forwarder
) -> None:
    await _publish(amqp, 40)
    gate = asyncio.Event()
    taken: list[tuple[int, bool]] = []

    async def work(message: Delivery) -> None:
        taken.append((json.loads(message.body)["n"], message.redelivered))
        await gate.wait()  # held: none is acked before the connection goes

    source = LinkSource(amqp, QUEUE, prefetch=16, name="paybus-test-consumer")
    consumer = Consumer(source, QUEUE, work, forwarder, _database_up, 16, coalesce_acks=True)
    running = asyncio.create_task(consumer.run())
    try:
        await wait_for(lambda: _true(len(taken) == 16))  # the prefetch, and no more
        first_link = source._link
        vhost = urlsplit(amqp).path.lstrip("/")
        rabbitmqctl("close_all_connections", "--vhost", vhost, "--limit", "10", "closed by the test")
        await wait_for(lambda: _true(source._link is not first_link and not source.is_closed), timeout=15)
        gate.set()  # the old link's work ends; its acks fail and the broker has those messages back
        await wait_for(lambda: _acked(consumer, 40), timeout=30)
    finally:
        gate.set()
        await consumer.stop()
        running.cancel()
        await source.close()
    redelivered = {n for n, again in taken if again}
    assert set(range(16)) <= redelivered  # the 16 in hand came again, marked as such
    assert sorted({n for n, _ in taken}) == list(range(40))
    assert await queue_depth(amqp, QUEUE) == 0


async def _true(value: bool) -> bool:
    return value


async def test_a_deleted_queue_cancels_the_consumer_and_ends_the_link(amqp: str) -> None:
    link = await ConsumeLink.connect(
        Endpoint.parse(amqp), name="paybus-test-consumer", prefetch=4, timeout=10
    )

    async def work(message: Delivery) -> None:
        return None

    try:
        await link.consume(QUEUE, work)
        connection = await aio_pika.connect(amqp)
        async with connection:
            await (await connection.channel()).queue_delete(QUEUE)
        reason = await asyncio.wait_for(link.wait_closed(), 10)
    finally:
        await link.close()
    assert "cancelled the consumer" in str(reason)


async def test_consuming_a_missing_queue_fails_with_the_brokers_reason(amqp: str) -> None:
    link = await ConsumeLink.connect(
        Endpoint.parse(amqp), name="paybus-test-consumer", prefetch=4, timeout=10
    )

    async def work(message: Delivery) -> None:
        return None

    try:
        with pytest.raises(Exception, match="404"):
            await link.consume("paybus.test.no-such-queue", work)
    finally:
        await link.close()


async def test_a_cancel_the_broker_does_not_answer_gives_the_link_up_and_the_next_consume_opens_another(
    amqp: str,
) -> None:
    parts = urlsplit(amqp)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    url = urlunsplit(parts._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}"))
    source = LinkSource(url, QUEUE, prefetch=4, name="paybus-test-consumer", cancel_timeout=0.5)

    async def work(message: Delivery) -> None:
        return None

    try:
        tag = await source.consume(work)
        first = source._link
        proxy.freeze()  # the broker's CancelOk never arrives
        with pytest.raises(TimeoutError):
            await source.cancel(tag)
        assert source.is_closed  # given up, so a consumer the broker may still run is not kept
        proxy.thaw()
        await source.consume(work)
        assert source._link is not first and not source.is_closed
    finally:
        await source.close()
        await proxy.close()
