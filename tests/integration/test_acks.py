"""Coalesced acks on a real broker: one frame per run, never past a message still in hand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from processor.acks import MISSING_TAG_SECONDS, Acks
from processor.consumer import Consumer, Forwarder
from shared.amqp import declare_topology, topology
from tests.support import queue_depth, wait_for

QUEUE = "paybus.test.acks"
COUNT = 10


class InHand:
    """``COUNT`` deliveries of a fresh quorum queue, taken by a consumer and not yet settled."""

    def __init__(self, amqp: str, channel: AbstractChannel) -> None:
        self.amqp = amqp
        self.channel = channel
        self.messages: list[AbstractIncomingMessage] = []

    async def close_channel(self) -> None:
        """Close the consuming channel: the broker returns every delivery not acked to the queue."""
        await self.channel.close()


@pytest.fixture
async def in_hand(make_vhost: Callable[[], str]) -> AsyncIterator[InHand]:
    amqp = make_vhost()
    connection = await aio_pika.connect(amqp)
    publisher = await connection.channel(publisher_confirms=True)
    await publisher.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    for index in range(COUNT):
        await publisher.default_exchange.publish(aio_pika.Message(str(index).encode()), routing_key=QUEUE)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=COUNT)
    held = InHand(amqp, channel)

    async def take(message: AbstractIncomingMessage) -> None:
        held.messages.append(message)

    await (await channel.get_queue(QUEUE)).consume(take)
    await wait_for(lambda: _count(held.messages, COUNT))
    assert [m.delivery_tag for m in held.messages] == list(range(1, COUNT + 1))
    assert [m.body for m in held.messages] == [str(i).encode() for i in range(COUNT)]
    yield held
    await connection.close()


def _acks(held: InHand, missing_tag_seconds: float = MISSING_TAG_SECONDS) -> Acks:
    """Acks that have seen every delivery in hand, as the consumer's do."""
    acks = Acks(missing_tag_seconds)
    for message in held.messages:
        acks.delivered(message)
    return acks


async def _count(items: list[Any], n: int) -> bool:
    return len(items) >= n


async def _returned_after_close(held: InHand, expected: int) -> int:
    """Close the consuming channel; the queue's depth once the broker has taken back ``expected``
    messages (it does so just after the close, not with it), or after 5 s if it never does."""
    await held.close_channel()
    deadline = asyncio.get_running_loop().time() + 5
    depth = await queue_depth(held.amqp, QUEUE)
    while depth != expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        depth = await queue_depth(held.amqp, QUEUE)
    return depth


async def test_messages_settled_together_leave_as_one_ack(in_hand: InHand) -> None:
    acks = _acks(in_hand)
    await asyncio.gather(*(acks.ack(m) for m in reversed(in_hand.messages)))
    assert acks.frames == 1
    assert await _returned_after_close(in_hand, 0) == 0  # all ten acked by that one frame


async def test_no_ack_passes_a_message_still_in_hand(in_hand: InHand) -> None:
    acks = _acks(in_hand)
    fourth = in_hand.messages[3]
    waiting = [asyncio.create_task(acks.ack(m)) for m in in_hand.messages if m is not fourth]
    await wait_for(lambda: _done(waiting[:3]))  # the run before the fourth is acked...
    await asyncio.sleep(0.2)  # ...and, however long we look, none after it
    assert [t.done() for t in waiting] == [True] * 3 + [False] * 6
    assert acks.frames == 1

    await acks.ack(fourth)  # the run now reaches the end: one more frame settles all seven
    await asyncio.gather(*waiting)
    assert acks.frames == 2
    assert await _returned_after_close(in_hand, 0) == 0


async def test_a_message_in_hand_when_the_channel_closes_comes_back_with_those_after_it(
    in_hand: InHand,
) -> None:
    acks = _acks(in_hand)
    fourth = in_hand.messages[3]
    waiting = [asyncio.create_task(acks.ack(m)) for m in in_hand.messages if m is not fourth]
    await wait_for(lambda: _done(waiting[:3]))
    assert await _returned_after_close(in_hand, 7) == 7  # the fourth and the six held back behind it
    acks.unsettled(fourth)  # its work ends without an ack: the waiting ones learn the channel is gone
    results = await asyncio.gather(*waiting[3:], return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results)


async def test_a_run_passes_a_nacked_message(in_hand: InHand) -> None:
    acks = _acks(in_hand)
    fourth = in_hand.messages[3]
    await fourth.nack(requeue=False)  # the test queue has no dead-letter exchange: the broker drops it
    acks.nacked(fourth)
    await asyncio.gather(*(acks.ack(m) for m in in_hand.messages if m is not fourth))
    assert acks.frames == 1
    assert not in_hand.channel.is_closed  # a `multiple` ack naming a settled tag would close it
    assert await _returned_after_close(in_hand, 0) == 0


async def test_a_message_left_unsettled_makes_its_channel_ack_one_by_one(in_hand: InHand) -> None:
    acks = _acks(in_hand)
    fourth = in_hand.messages[3]
    acks.unsettled(fourth)  # as when a shutdown leaves it in hand: the broker must get it back
    await asyncio.gather(*(acks.ack(m) for m in in_hand.messages if m is not fourth))
    assert acks.frames == COUNT - 1
    assert await _returned_after_close(in_hand, 1) == 1
    assert await queue_depth(in_hand.amqp, QUEUE) == 1


async def test_a_run_waiting_for_a_delivery_never_seen_goes_one_by_one(in_hand: InHand) -> None:
    """Should a delivery never reach the consumer, later messages are acked anyway, and that one is not."""
    acks = Acks(missing_tag_seconds=0.3)
    first, *rest = in_hand.messages
    for message in rest:  # the first one "never arrived"
        acks.delivered(message)
    await asyncio.wait_for(asyncio.gather(*(acks.ack(m) for m in rest)), timeout=10)
    assert acks.frames == COUNT - 1
    assert await _returned_after_close(in_hand, 1) == 1  # the broker still holds it: not acked unseen


async def test_the_wait_for_a_missing_delivery_is_timed_again_for_the_next_one(in_hand: InHand) -> None:
    acks = Acks(missing_tag_seconds=0.3)
    first, second, *rest = in_hand.messages
    for message in rest:
        acks.delivered(message)
    waiting = [asyncio.create_task(acks.ack(m)) for m in rest]
    await asyncio.sleep(0.05)  # the run is flushed and now waits for the first, unseen (timer: 0.3 s)
    acks.delivered(first)  # it turns up late and is acked: the run moves on to wait for the second
    await asyncio.wait_for(acks.ack(first), timeout=10)
    await asyncio.wait_for(asyncio.gather(*waiting), timeout=10)
    assert acks.frames == 1 + len(rest)  # the first in a run of its own, the rest one by one
    assert await _returned_after_close(in_hand, 1) == 1  # the second is still the broker's


async def _done(tasks: list[asyncio.Task[None]]) -> bool:
    return all(t.done() for t in tasks)


async def test_the_event_consumer_acks_a_batch_in_one_frame(make_vhost: Callable[[], str]) -> None:
    """The consumer wiring: work that settles twenty messages at once costs one ack frame, not twenty."""
    amqp = make_vhost()
    connection = await aio_pika.connect(amqp)
    async with connection:
        setup = await connection.channel()
        await declare_topology(setup, topology((1000,)))
        await setup.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        publisher = await connection.channel(publisher_confirms=True)
        for index in range(20):
            await publisher.default_exchange.publish(aio_pika.Message(str(index).encode()), routing_key=QUEUE)
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=20)
        forwarder = Forwarder(channel, QUEUE, (1000,))
        await forwarder.open()
        gate = asyncio.Event()
        started: list[bytes] = []

        async def work(message: AbstractIncomingMessage) -> None:  # a batch: all commit together
            started.append(message.body)
            if len(started) == 20:
                gate.set()
            await gate.wait()

        async def database_up() -> None:
            return None

        consumer = Consumer(channel, QUEUE, work, forwarder, database_up, 20, coalesce_acks=True)
        running = asyncio.create_task(consumer.run())
        await wait_for(lambda: _acked_once_all_started(consumer, started))
        await consumer.stop()
        running.cancel()
        assert consumer.acks is not None and consumer.acks.frames == 1
        assert await _returned_after_close_of(channel, amqp) == 0


async def _acked_once_all_started(consumer: Consumer, started: list[bytes]) -> bool:
    return len(started) == 20 and consumer.acks is not None and consumer.acks.frames > 0


async def _returned_after_close_of(channel: AbstractChannel, amqp: str) -> int:
    await channel.close()
    return await queue_depth(amqp, QUEUE)
