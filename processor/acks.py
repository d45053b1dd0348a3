"""Acks of one consumer: each run of settled deliveries goes back to the broker as one `multiple` ack.

`basic.ack` with multiple=true settles every unacked delivery of the channel up to the tag it names,
so it may name a tag only when every earlier delivery is settled: acked here, or nacked already (a
nack is written before its message counts as settled here, so the broker has it first). A channel's
deliveries carry consecutive tags from 1, so a run is plain to see: from the first tag not yet given
back, as far as settled tags reach. Acks settled in one turn of the event loop (a committed batch)
leave as one frame. Per message, acking cost the broker more CPU than delivering (a quorum queue logs
every ack) and the processor about a tenth of its CPU (tests/bench/README.md).

A message whose work ends without an ack or a nack (a shutdown leaves messages in hand unacked for the
broker to return) would hold back every later ack of its channel, and a `multiple` ack past it would
settle it unprocessed: from then on that channel acks one message at a time. So does a channel whose
run waits too long for a tag that never reached the consumer (aiormq drops a delivery whose consumer
it no longer knows; none is known to happen here): later messages must not wait on it forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelInvalidStateError

log = logging.getLogger("paybus.processor")

# A settled delivery waiting for its run: the message to ack (None: nacked already) and who waits.
_Settled = tuple[AbstractIncomingMessage | None, "asyncio.Future[None] | None"]
FIRST_TAG: Final = 1
# How long a run may wait for a tag the consumer never saw before the channel goes one by one.
MISSING_TAG_SECONDS: Final = 30.0


class _ChannelAcks:
    def __init__(self) -> None:
        self.next = FIRST_TAG  # the lowest tag not yet given back to the broker
        self.settled: dict[int, _Settled] = {}
        self.seen: set[int] = set()  # delivered to the consumer, not yet passed
        self.one_by_one = False
        self.watching: asyncio.TimerHandle | None = None  # a run waits for a tag not seen...
        self.watched = 0  # ...this one


class Acks:
    """Acks for one consumer's deliveries, coalesced per channel (see the module doc)."""

    def __init__(self, missing_tag_seconds: float = MISSING_TAG_SECONDS) -> None:
        self._missing_after = missing_tag_seconds
        self._channels: dict[Any, _ChannelAcks] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._again = False
        self.frames = 0  # basic.ack frames written
        self.acked = 0  # messages those frames acked

    def _state(self, message: AbstractIncomingMessage) -> _ChannelAcks | None:
        """The acks of ``message``'s channel; None once that channel is closed."""
        try:
            channel = message.channel
        except ChannelInvalidStateError:
            channel = None
        state = self._channels.get(channel)
        if state is None:
            # Deliveries of a closed channel can no longer be acked (the broker has them back); a
            # robust connection delivers on a new channel, whose tags start again at 1.
            for old in [c for c in self._channels if c.is_closed]:
                self._abandon_channel(old)
            if channel is not None:
                state = self._channels[channel] = _ChannelAcks()
        return state

    def delivered(self, message: AbstractIncomingMessage) -> None:
        """``message`` reached the consumer (call before its work starts)."""
        tag = message.delivery_tag
        state = self._state(message)
        if state is not None and tag is not None and tag >= state.next:
            state.seen.add(tag)

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Ack ``message``; return once an ack covering it is written (raise if that failed)."""
        tag = message.delivery_tag
        state = self._state(message)
        if state is None:
            raise ChannelInvalidStateError("channel closed before the message was acked")
        if state.one_by_one or tag is None or tag < state.next:
            self.frames += 1
            self.acked += 1
            await message.ack()
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.settled[tag] = (message, done)
        self._schedule()
        await done

    def nacked(self, message: AbstractIncomingMessage) -> None:
        """``message`` was nacked or rejected (the frame is written): later runs may pass its tag."""
        tag = message.delivery_tag
        state = self._state(message)
        if state is not None and tag is not None and tag >= state.next:
            state.settled[tag] = (None, None)
            self._schedule()

    def unsettled(self, message: AbstractIncomingMessage) -> None:
        """``message``'s work ended without an ack or a nack: never pass its tag with `multiple`."""
        tag = message.delivery_tag
        state = self._state(message)
        if state is None or tag is None or tag < state.next or tag in state.settled:
            return
        state.one_by_one = True
        self._schedule()

    def _schedule(self) -> None:
        # A task, not an ack at once: every message settled in this turn of the loop joins the run.
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="amqp-acks")
        else:
            self._again = True

    async def _flush(self) -> None:
        while True:
            self._again = False
            for channel, state in list(self._channels.items()):
                if state.one_by_one:
                    await self._one_by_one(state)
                else:
                    await self._run(state)
                if channel.is_closed and not state.settled:
                    self._channels.pop(channel, None)
            if not self._again:
                return

    async def _run(self, state: _ChannelAcks) -> None:
        last: AbstractIncomingMessage | None = None
        waiting: list[asyncio.Future[None]] = []
        while state.next in state.settled:
            message, done = state.settled.pop(state.next)
            state.seen.discard(state.next)
            state.next += 1
            if message is not None:
                last = message
            if done is not None:
                waiting.append(done)
        self._watch(state)
        if last is None:
            return
        try:
            self.frames += 1
            self.acked += len(waiting)
            await last.ack(multiple=True)
        except Exception as exc:  # the channel is gone: the broker returns these deliveries itself
            _settle(waiting, exc)
        else:
            _settle(waiting, None)

    def _watch(self, state: _ChannelAcks) -> None:
        """Time a run stuck at a tag the consumer never saw; stop timing once it moves on."""
        stuck = bool(state.settled) and state.next not in state.seen and not state.one_by_one
        if state.watching is not None and (not stuck or state.watched != state.next):
            state.watching.cancel()
            state.watching = None
        if stuck and state.watching is None:
            state.watched = state.next
            state.watching = asyncio.get_running_loop().call_later(self._missing_after, self._missing, state)

    def _missing(self, state: _ChannelAcks) -> None:
        state.watching = None
        if state.next == state.watched and state.next not in state.seen and state.settled:
            log.warning("delivery %d never reached the consumer; acking this channel one by one", state.next)
            state.one_by_one = True
            self._schedule()
        else:
            self._watch(state)  # moved on, perhaps to be stuck at another tag

    async def _one_by_one(self, state: _ChannelAcks) -> None:
        settled, state.settled = state.settled, {}
        for _, (message, done) in sorted(settled.items(), key=lambda item: item[0]):
            if message is None or done is None:
                continue
            try:
                self.frames += 1
                self.acked += 1
                await message.ack()
            except Exception as exc:
                _settle([done], exc)
            else:
                _settle([done], None)

    def _abandon_channel(self, channel: Any) -> None:
        state = self._channels.pop(channel)
        error = ConnectionError("channel closed before its deliveries were acked")
        _settle([done for _, done in state.settled.values() if done is not None], error)


def _settle(waiting: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for done in waiting:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
            with contextlib.suppress(Exception):
                done.exception()  # retrieved here too: a waiter gone at shutdown must not log it
