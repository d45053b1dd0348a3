"""aio-pika glue for the event queue: bounded concurrency, ack after commit, retry, dead-letter.

Each delivery runs in its own task (at most `prefetch` at once) with its own transaction. The message
is acked only after COMMIT; a crash before that redelivers it and the ledger absorbs the duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

import aio_pika
import psycopg
import psycopg_pool
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from pamqp.commands import Basic

from processor.errors import DatabaseUnavailable, Reject, Retry
from shared.amqp import DEAD_LETTER_EXCHANGE, RETRY_EXCHANGE, retry_queue_name
from shared.telemetry import ProcessorMetrics

log = logging.getLogger("paybus.processor")

H_ATTEMPTS: Final = "x-paybus-attempts"
H_REASON: Final = "x-paybus-reason"
H_ERROR: Final = "x-paybus-error"
H_FIRST_FAILED: Final = "x-paybus-first-failed-at"
H_ORIGINAL_EXCHANGE: Final = "x-paybus-original-exchange"
H_ORIGINAL_KEY: Final = "x-paybus-original-routing-key"
H_ORIGINAL_QUEUE: Final = "x-paybus-original-queue"

# Errors that mean "the database is not there", as opposed to "this message is bad".
DB_DOWN_ERRORS: Final = (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg.errors.AdminShutdown)
# Lock conflicts between concurrent transactions: safe to run again at once.
CONFLICT_ERRORS: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)

MessageWork = Callable[[AbstractIncomingMessage], Awaitable[None]]


def _header(message: AbstractIncomingMessage, name: str) -> Any:
    return (message.headers or {}).get(name)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


class Forwarder:
    """Confirmed publishes of failed messages to the retry queues or the dead letters."""

    def __init__(
        self,
        channel: AbstractChannel,
        queue_name: str,
        delays_ms: tuple[int, ...],
        metrics: ProcessorMetrics | None = None,
    ) -> None:
        self._metrics = metrics or ProcessorMetrics()
        self._channel = channel
        self._queue_name = queue_name
        self._delays = delays_ms
        self._retry: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None

    async def open(self) -> None:
        self._retry = await self._channel.get_exchange(RETRY_EXCHANGE, ensure=False)
        self._dead = await self._channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)

    def _copy(self, message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
        return aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id,
            timestamp=message.timestamp,
            type=message.type,
            app_id=message.app_id,
        )

    def _base_headers(self, message: AbstractIncomingMessage, error: str) -> dict[str, Any]:
        headers = dict(message.headers or {})
        headers.setdefault(H_ORIGINAL_EXCHANGE, message.exchange or "")
        headers.setdefault(H_ORIGINAL_KEY, message.routing_key or "")
        headers.setdefault(H_ORIGINAL_QUEUE, self._queue_name)
        headers.setdefault(H_FIRST_FAILED, datetime.now(UTC).isoformat())
        headers[H_ERROR] = error[:500]
        return headers

    async def retry_or_dead_letter(self, message: AbstractIncomingMessage, error: str) -> str:
        attempts = int(_header(message, H_ATTEMPTS) or 0) + 1
        headers = self._base_headers(message, error)
        headers[H_ATTEMPTS] = attempts
        if attempts > len(self._delays):
            headers[H_REASON] = "retries-exhausted"
            await self._publish(self._dead, self._copy(message, headers), "")
            self._metrics.dead_letters.labels(self._queue_name, "retries-exhausted").inc()
            return "dead-lettered"
        key = retry_queue_name(self._queue_name, self._delays[attempts - 1])
        await self._publish(self._retry, self._copy(message, headers), key)
        self._metrics.retries.labels(self._queue_name).inc()
        return "retry"

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str, error: str) -> None:
        headers = self._base_headers(message, error)
        headers[H_REASON] = reason
        headers[H_ATTEMPTS] = int(_header(message, H_ATTEMPTS) or 0) + 1
        await self._publish(self._dead, self._copy(message, headers), "")
        self._metrics.dead_letters.labels(self._queue_name, reason).inc()

    async def _publish(self, exchange: AbstractExchange | None, message: aio_pika.Message, key: str) -> None:
        assert exchange is not None, "Forwarder.open() not called"
        confirmation = await exchange.publish(message, routing_key=key, mandatory=True, timeout=10)
        if not isinstance(confirmation, Basic.Ack):
            raise RuntimeError("retry/dead-letter publish not confirmed")


class Consumer:
    """Runs ``work`` for every message of one queue; pauses while the database is down."""

    def __init__(
        self,
        channel: AbstractChannel,
        queue_name: str,
        work: MessageWork,
        forwarder: Forwarder,
        db_check: Callable[[], Awaitable[None]],
        prefetch: int,
    ) -> None:
        self._channel = channel
        self._queue_name = queue_name
        self._work = work
        self._forwarder = forwarder
        self._db_check = db_check
        self._prefetch = prefetch
        self._tasks: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(prefetch)
        self.db_ready = asyncio.Event()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        queue = await self._channel.get_queue(self._queue_name, ensure=False)
        while not self._stopping.is_set():
            await self._wait_for_database()
            async with queue.iterator() as it:
                async for message in it:
                    await self._limit.acquire()
                    task = asyncio.create_task(self._handle(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    if not self.db_ready.is_set() or self._stopping.is_set():
                        break  # closing the iterator cancels the consumer and returns buffered messages
            await self._drain()

    async def stop(self) -> None:
        self._stopping.set()
        await self._drain()

    async def _drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _wait_for_database(self) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            try:
                await self._db_check()
            except DB_DOWN_ERRORS as exc:
                self.db_ready.clear()
                log.warning("database unavailable (%s); not taking work", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if not self.db_ready.is_set():
                log.info("database available; taking work")
            self.db_ready.set()
            return

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._handle_one(message)
        except Exception:
            # Only reachable when the broker connection is gone: the message is redelivered anyway.
            log.exception("could not settle message")
        finally:
            self._limit.release()

    async def _handle_one(self, message: AbstractIncomingMessage) -> None:
        for _ in range(5):
            try:
                await self._work(message)
                await message.ack()
                return
            except CONFLICT_ERRORS:
                continue  # the other transaction has committed or rolled back; go again
            except (DatabaseUnavailable, *DB_DOWN_ERRORS) as exc:
                self.db_ready.clear()
                log.warning("database unavailable (%s); message returned to the queue", type(exc).__name__)
                await message.nack(requeue=True)
                return
            except Reject as exc:
                log.warning("dead-lettering message: %s (%s)", exc.reason, exc.detail)
                await self._forwarder.dead_letter(message, exc.reason, exc.detail)
                await message.ack()
                return
            except Retry as exc:
                outcome = await self._forwarder.retry_or_dead_letter(message, str(exc))
                log.warning("transient failure, %s: %s", outcome, exc)
                await message.ack()
                return
            except Exception as exc:
                # A bug or an unexpected payload: bounded retries, then the dead letters.
                log.exception("processing failed")
                await self._forwarder.retry_or_dead_letter(message, f"{type(exc).__name__}: {str(exc)[:300]}")
                await message.ack()
                return
        await self._forwarder.retry_or_dead_letter(message, "lock conflicts persisted")
        await message.ack()
