"""Consuming a work queue: bounded concurrency, ack after commit, retry, dead-letter.

The event queue is consumed over a link of paybus's own (`LinkSource`, `shared.consume_link`), the
request queue over aio-pika's channel (`ChannelSource`); retries and dead letters are published with
aio-pika for both.

Each delivery runs in its own task (at most `prefetch` at once: the broker sends no more unacked
messages) with its own transaction. The message is acked only after COMMIT; a crash before that
redelivers it and the ledger absorbs the duplicate. Event acks leave coalesced, one frame per run of
settled messages (`processor.acks`).

While Postgres is down nothing is acked, nothing is returned and nothing is dead-lettered: the consumer
is cancelled so no new work arrives, and the few messages already in hand wait in memory until the
database answers again. Returning them instead would count as a failed delivery on RabbitMQ before 4.3,
and a long or flapping outage would then push healthy messages over the queue's delivery limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import aio_pika
import psycopg
import psycopg_pool
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    ConsumerTag,
)
from pamqp.commands import Basic

from processor.acks import Acks
from processor.errors import DatabaseUnavailable, Reject, Retry
from shared.amqp import DEAD_LETTER_EXCHANGE, RETRY_EXCHANGE, copy_message, retry_queue_name, retry_tiers
from shared.consume_link import ConsumeLink
from shared.headers import (
    H_ATTEMPTS,
    H_DEAD_LETTERED,
    H_ERROR,
    H_FIRST_FAILED,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_KEY,
    H_ORIGINAL_QUEUE,
    H_REASON,
)
from shared.link import Endpoint
from shared.telemetry import ProcessorMetrics

log = logging.getLogger("paybus.processor")

# Written by the broker; stale on a copy we publish ourselves (our own headers are the record).
BROKER_HEADERS: Final = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)

# Errors that mean "the database is not there", as opposed to "this message is bad".
DB_DOWN_ERRORS: Final = (
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    psycopg.errors.AdminShutdown,
    DatabaseUnavailable,
)
# Lock conflicts between concurrent transactions: safe to run again at once.
CONFLICT_ERRORS: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
CONFLICT_RUNS: Final = 5
DB_WATCH_SECONDS: Final = 2.0

MessageWork = Callable[[AbstractIncomingMessage], Awaitable[None]]
LINK_CONNECT_TIMEOUT: Final = 10.0


class QueueSource(Protocol):
    """Where a `Consumer` takes its deliveries from: start and stop consuming, and notice the end."""

    async def consume(self, callback: Callable[[Any], Coroutine[Any, Any, None]]) -> str: ...

    async def cancel(self, tag: str) -> None: ...

    async def lost(self) -> None:
        """Return when deliveries stopped by themselves and `consume` must be called again."""

    @property
    def is_closed(self) -> bool: ...


class ChannelSource:
    """A queue on an aio-pika channel; a robust connection restores the consumer by itself."""

    def __init__(self, channel: AbstractChannel, queue_name: str) -> None:
        self._channel = channel
        self._queue_name = queue_name
        self._queue: AbstractQueue | None = None

    async def consume(self, callback: Callable[[Any], Coroutine[Any, Any, None]]) -> str:
        if self._queue is None:
            self._queue = await self._channel.get_queue(self._queue_name, ensure=False)
        tag: ConsumerTag = await self._queue.consume(callback)
        return tag

    async def cancel(self, tag: str) -> None:
        assert self._queue is not None
        await self._queue.cancel(tag)

    async def lost(self) -> None:
        await asyncio.Event().wait()  # never: aio-pika restores the consumer on a new channel

    @property
    def is_closed(self) -> bool:
        return self._channel.is_closed


class LinkSource:
    """A queue consumed over `shared.consume_link`: a new link (and consumer) whenever one ends."""

    def __init__(
        self,
        amqp_url: str,
        queue_name: str,
        prefetch: int,
        name: str,
        cancel_timeout: float = LINK_CONNECT_TIMEOUT,
    ) -> None:
        self._endpoint = Endpoint.parse(amqp_url)
        self._cancel_timeout = cancel_timeout
        self._queue_name = queue_name
        self._prefetch = prefetch
        self._name = name
        self._link: ConsumeLink | None = None

    async def consume(self, callback: Callable[[Any], Coroutine[Any, Any, None]]) -> str:
        link = self._link
        if link is None or link.is_closed:
            link = self._link = await ConsumeLink.connect(
                self._endpoint, name=self._name, prefetch=self._prefetch, timeout=LINK_CONNECT_TIMEOUT
            )
        return await link.consume(self._queue_name, callback)

    async def cancel(self, tag: str) -> None:
        link = self._link
        if link is None or link.is_closed:
            return
        try:
            async with asyncio.timeout(self._cancel_timeout):  # a broker gone silent must not hold a stop
                await link.cancel(tag)
        except BaseException:
            await link.close()  # the consumer may still be on: the next `consume` starts on a new link
            raise

    async def lost(self) -> None:
        assert self._link is not None
        reason = await self._link.wait_closed()
        log.warning("event queue link ended (%s); consuming again on a new one", reason)

    @property
    def is_closed(self) -> bool:
        return self._link is None or self._link.is_closed

    async def close(self) -> None:
        if self._link is not None:
            await self._link.close()


def _header(message: AbstractIncomingMessage, name: str) -> Any:
    return (message.headers or {}).get(name)


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Forwarder:
    """Confirmed publishes of failed messages to the retry queues or the dead letters."""

    def __init__(
        self,
        channel: AbstractChannel,
        queue_name: str,
        delays_ms: tuple[int, ...],
        metrics: ProcessorMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._metrics = metrics or ProcessorMetrics()
        self._channel = channel
        self._queue_name = queue_name
        self._tiers = retry_tiers(delays_ms)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._retry: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None

    async def open(self) -> None:
        self._retry = await self._channel.get_exchange(RETRY_EXCHANGE, ensure=False)
        self._dead = await self._channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)

    def _base_headers(self, message: AbstractIncomingMessage, error: str) -> dict[str, Any]:
        headers = {k: v for k, v in (message.headers or {}).items() if k not in BROKER_HEADERS}
        # Set once, on the first failure: a message coming back from a delay queue arrives through the
        # default exchange, and the exchange and key to requeue to are the ones Stripe's event came by.
        headers.setdefault(H_ORIGINAL_EXCHANGE, message.exchange or "")
        headers.setdefault(H_ORIGINAL_KEY, message.routing_key or "")
        headers.setdefault(H_ORIGINAL_QUEUE, self._queue_name)
        headers.setdefault(H_FIRST_FAILED, _now())
        headers[H_ERROR] = error[:500]
        return headers

    async def retry_or_dead_letter(self, message: AbstractIncomingMessage, error: str) -> str:
        """Send to the next retry tier, or to the dead letters after the last one; say which."""
        attempts = int(_header(message, H_ATTEMPTS) or 0) + 1
        headers = self._base_headers(message, error)
        headers[H_ATTEMPTS] = attempts
        if attempts > len(self._tiers):
            headers[H_REASON] = "retries-exhausted"
            headers[H_DEAD_LETTERED] = _now()
            await self._publish(self._dead, copy_message(message, headers), "")
            self._metrics.dead_letters.labels(self._queue_name, "retries-exhausted").inc()
            return "dead-lettered"
        delay = self._rng.choice(self._tiers[attempts - 1])
        key = retry_queue_name(self._queue_name, delay)
        await self._publish(self._retry, copy_message(message, headers), key)
        self._metrics.retries.labels(self._queue_name).inc()
        return f"retry in {delay}ms"

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str, error: str) -> None:
        headers = self._base_headers(message, error)
        headers[H_REASON] = reason
        headers[H_ATTEMPTS] = int(_header(message, H_ATTEMPTS) or 0) + 1
        headers[H_DEAD_LETTERED] = _now()
        await self._publish(self._dead, copy_message(message, headers), "")
        self._metrics.dead_letters.labels(self._queue_name, reason).inc()

    async def _publish(self, exchange: AbstractExchange | None, message: aio_pika.Message, key: str) -> None:
        assert exchange is not None, "Forwarder.open() not called"
        confirmation = await exchange.publish(message, routing_key=key, mandatory=True, timeout=10)
        if not isinstance(confirmation, Basic.Ack):  # a returned (unroutable) message comes back here
            raise RuntimeError(f"retry/dead-letter publish to {key or exchange.name!r} not confirmed")


class Consumer:
    """Runs ``work`` for every message of one queue; stops taking work while the database is down."""

    def __init__(
        self,
        channel: AbstractChannel | QueueSource,
        queue_name: str,
        work: MessageWork,
        forwarder: Forwarder,
        db_check: Callable[[], Awaitable[None]],
        prefetch: int,
        *,
        coalesce_acks: bool = False,
    ) -> None:
        self.source: QueueSource = (
            ChannelSource(channel, queue_name) if isinstance(channel, AbstractChannel) else channel
        )
        # Events settle a batch at a time, so their acks coalesce; a request settles alone anyway.
        self.acks = Acks() if coalesce_acks else None
        self._queue_name = queue_name
        self._work = work
        self._forwarder = forwarder
        self._db_check = db_check
        self._prefetch = prefetch
        self._tasks: set[asyncio.Task[Any]] = set()
        self.db_ready = asyncio.Event()
        self._db_lost = asyncio.Event()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        source = self.source
        while not self._stopping.is_set():
            await self._wait_for_database()
            if self._stopping.is_set():
                break
            self._db_lost.clear()
            try:
                tag = await source.consume(self._on_message)
            except Exception as exc:  # channel being restored after a broker restart: try again soon
                log.warning("could not start consuming (%s); retrying", type(exc).__name__)
                await _first(asyncio.sleep(1), self._stopping.wait())
                continue
            await _first(self._db_lost.wait(), self._stopping.wait(), self._watch_database(), source.lost())
            # No new deliveries from here on; the messages in hand stay unacked (they are not returned).
            try:
                await source.cancel(tag)
            except Exception as exc:  # channel gone: the broker returns everything by itself
                log.warning("could not cancel consumer (%s)", type(exc).__name__)
        await self._drain()

    async def stop(self) -> None:
        self._stopping.set()
        await self._drain()

    async def _drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _database_up(self) -> bool:
        try:
            await self._db_check()
        except DB_DOWN_ERRORS:
            return False
        return True

    async def _wait_for_database(self) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            if await self._database_up():
                if not self.db_ready.is_set():
                    log.info("database available; taking work")
                self.db_ready.set()
                return
            if self.db_ready.is_set() or delay == 0.2:
                log.warning("database unavailable; not taking work")
            self.db_ready.clear()
            await _first(asyncio.sleep(delay), self._stopping.wait())
            delay = min(delay * 2, 5.0)

    async def _watch_database(self) -> None:
        """Notice an outage while idle too, so readiness is honest before the next message fails."""
        while True:
            await asyncio.sleep(DB_WATCH_SECONDS)
            if not await self._database_up():
                self._database_lost()
                return

    def _database_lost(self) -> None:
        if self.db_ready.is_set():
            log.warning("database unavailable; pausing consumption, messages in hand wait unacked")
        self.db_ready.clear()
        self._db_lost.set()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Each delivery callback runs in its own task (either source); keep a handle so stop() waits for it.
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        if self.acks is not None:
            self.acks.delivered(message)
        try:
            await self._handle(message)
        finally:
            self._tasks.discard(task)
            if self.acks is not None:
                self.acks.unsettled(message)  # a no-op unless it was left unacked (shutting down)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._handle_one(message)
        except Exception:
            # The broker connection is gone (the message is redelivered anyway), or a retry/dead-letter
            # publish was not confirmed: return it, so the queue's delivery limit bounds the loop.
            log.exception("could not settle message")
            with contextlib.suppress(Exception):  # channel closed: the broker has already requeued it
                await message.nack(requeue=True)
                if self.acks is not None:
                    self.acks.nacked(message)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        if self.acks is not None:
            await self.acks.ack(message)
        else:
            await message.ack()

    async def _handle_one(self, message: AbstractIncomingMessage) -> None:
        conflicts = 0
        while True:
            try:
                await self._work(message)
            except CONFLICT_ERRORS:
                conflicts += 1
                if conflicts < CONFLICT_RUNS:
                    continue  # the other transaction has committed or rolled back; go again
                error = "lock conflicts persisted"
            except DB_DOWN_ERRORS as exc:
                if not await self._database_up():
                    self._database_lost()
                    await _first(self.db_ready.wait(), self._stopping.wait())
                    if self.db_ready.is_set():
                        continue  # same message, not counted as an attempt: it was not its fault
                    return  # shutting down: leave it unacked, the broker returns it on close
                if isinstance(exc, psycopg_pool.PoolTimeout):
                    continue  # every pooled connection busy (load, not this message): wait again
                # The database answers, so the failure belonged to this message (a statement
                # timeout, say): a bounded retry, not an endless pause.
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
            except Reject as exc:
                log.warning("dead-lettering message: %s (%s)", exc.reason, exc.detail)
                await self._forwarder.dead_letter(message, exc.reason, exc.detail)
                await self._ack(message)
                return
            except Retry as exc:
                error = str(exc)
            except Exception as exc:
                # A bug or an unexpected payload: bounded retries, then the dead letters.
                log.exception("processing failed")
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
            else:
                # Outside the try: an ack that fails (channel lost) is not a processing failure; the
                # broker redelivers the message and the ledger absorbs it.
                await self._ack(message)
                return
            outcome = await self._forwarder.retry_or_dead_letter(message, error)
            log.warning("transient failure, %s: %s", outcome, error)
            await self._ack(message)
            return


async def _first(*waits: Awaitable[Any]) -> None:
    """Wait until the first of ``waits`` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
