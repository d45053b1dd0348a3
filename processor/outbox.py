"""Transactional outbox: `emit` writes a domain event in the caller's transaction; `OutboxRelay` publishes.

The relay claims unpublished rows with `FOR UPDATE SKIP LOCKED` (several processors share the table
without publishing the same row twice at once), publishes them to `paybus.events` with publisher
confirms, and marks them published in the same transaction. A crash between confirm and commit
publishes a row again after restart: at-least-once, and consumers dedupe on the stable `message_id`.
Not mandatory: an event no queue is bound to is confirmed and dropped, as a topic exchange does;
subscribers that must not miss events bind durable queues.
It wakes on `NOTIFY paybus_outbox` (sent by a trigger on `outbox`, so for any writer, delivered at
commit) and polls as a fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Final

import psycopg
import psycopg_pool
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from processor.statements import send
from shared import domain_events
from shared.amqp import DOMAIN_EXCHANGE
from shared.publisher import Publisher, PublishFailed
from shared.telemetry import ProcessorMetrics

log = logging.getLogger("paybus.outbox")

CHANNEL: Final = "paybus_outbox"
CONFIRM_TIMEOUT: Final = 10.0  # seconds for the broker to confirm a whole batch

_INSERT: Final = """
INSERT INTO outbox (id, event_type, user_id, payload) VALUES (%s, %s, %s, %s::jsonb)
"""
# A batch's rows in one statement, in the order they were emitted (so `seq` keeps that order).
_INSERT_MANY: Final = """
INSERT INTO outbox (id, event_type, user_id, payload)
SELECT v.id::uuid, v.event_type, v.user_id::uuid, v.payload::jsonb
  FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[]) AS v(id, event_type, user_id, payload)
"""
_CLAIM: Final = """
SELECT seq, id, event_type, payload::text FROM outbox
 WHERE published_at IS NULL ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED
"""
_MARK: Final = "UPDATE outbox SET published_at = now() WHERE seq = ANY(%s)"
_BACKLOG: Final = "SELECT count(*) FROM outbox WHERE published_at IS NULL"


def new_id() -> str:
    return str(uuid.uuid4())


_Row = tuple[str, str, str | None, str]

# Set while a batch's chains run (`held`): emit() keeps rows there instead of writing each one.
_HELD: ContextVar[list[_Row] | None] = ContextVar("paybus_outbox_held", default=None)


async def emit(conn: AsyncConnection[Any], event: domain_events.DomainEvent) -> None:
    """Store ``event`` in the outbox; it is published only if the surrounding transaction commits.

    Inside `held` the row is kept, and `write_held` stores it with the rest of its batch. Nothing in a
    transaction reads the outbox, so holding a row back changes no handler's view.
    """
    row = (event.id, str(event.__struct_config__.tag), event.user_id, domain_events.encode(event).decode())
    held = _HELD.get()
    if held is not None:
        held.append(row)
    else:
        await send(conn, _INSERT, row)
    # The insert trigger (migration 0005) sends NOTIFY paybus_outbox, delivered at commit.


@contextlib.contextmanager
def held() -> Iterator[list[_Row]]:
    """Keep the rows emitted in this context (and the tasks started in it) for one `write_held`."""
    rows: list[_Row] = []
    token = _HELD.set(rows)
    try:
        yield rows
    finally:
        _HELD.reset(token)


async def write_held(conn: AsyncConnection[Any], rows: list[_Row]) -> None:
    """Store the rows `held` kept, in one INSERT over binary arrays (one statement for a whole batch)."""
    if rows:
        await send(conn, _INSERT_MANY, [list(column) for column in zip(*rows, strict=True)])


def relay_publisher(amqp_url: str) -> Publisher:
    """The relay's own link to `paybus.events` (checked passively: the processor declares topology)."""
    return Publisher(
        amqp_url, CONFIRM_TIMEOUT, exchange=DOMAIN_EXCHANGE, declare=False, name="paybus-processor-outbox"
    )


class OutboxRelay:
    """Publishes outbox rows until stopped; survives database and broker outages by backing off."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        publisher: Publisher,
        listen_conninfo: str,
        *,
        batch: int = 100,
        poll_interval: float = 1.0,
        metrics: ProcessorMetrics | None = None,
    ) -> None:
        self._metrics = metrics or ProcessorMetrics()
        self._pool = pool
        self._publisher = publisher
        self._conninfo = listen_conninfo
        self._batch = batch
        self._poll = poll_interval
        self._stopping = asyncio.Event()
        self.published = 0

    async def run(self) -> None:
        listener: AsyncConnection[Any] | None = None
        delay = self._poll
        while not self._stopping.is_set():
            try:
                if listener is None or listener.closed:
                    listener = await self._listen()
                while await self.relay_once() == self._batch and not self._stopping.is_set():
                    pass
                await self._measure_backlog()
                delay = self._poll
                await self._wait(listener)
            except Exception as exc:  # the relay must outlive any outage; rows stay until published
                if isinstance(exc, _OUTAGES):
                    log.warning("outbox relay paused (%s); retrying in %.1fs", type(exc).__name__, delay)
                else:
                    log.exception("outbox relay failed; retrying in %.1fs", delay)
                if listener is not None:
                    await listener.close()
                    listener = None
                await self._sleep(delay)
                delay = min(delay * 2, 10.0)
        if listener is not None:
            await listener.close()

    def stop(self) -> None:
        self._stopping.set()

    async def relay_once(self) -> int:
        """Publish one batch of unpublished rows; return how many were published.

        All the batch's publishes are written at once on the publisher's link, then their confirms
        awaited together (one timeout); persistent, not mandatory, message id = outbox id.
        """
        async with self._pool.connection() as conn, conn.transaction():
            rows = await (await conn.execute(_CLAIM, (self._batch,))).fetchall()
            if not rows:
                return 0
            now = int(time.time())
            send_one = self._publisher.send
            await self._publisher.confirmed(
                [
                    send_one(
                        payload.encode(),
                        event_type,
                        message_type=event_type,
                        message_id=str(row_id),
                        timestamp=now,
                        mandatory=False,
                    )
                    for _, row_id, event_type, payload in rows
                ]
            )
            await conn.execute(_MARK, ([seq for seq, *_ in rows],))
        self.published += len(rows)
        return len(rows)

    async def _measure_backlog(self) -> None:
        async with self._pool.connection() as conn:
            row = await (await conn.execute(_BACKLOG)).fetchone()
        self._metrics.outbox_backlog.set(row[0] if row else 0)

    async def _listen(self) -> AsyncConnection[Any]:
        conn = await AsyncConnection.connect(self._conninfo, autocommit=True)
        await conn.execute(f"LISTEN {CHANNEL}")
        return conn

    async def _wait(self, listener: AsyncConnection[Any]) -> None:
        """Until a NOTIFY arrives, the poll interval passes, or stop() is called."""
        async for _ in listener.notifies(timeout=self._poll, stop_after=1):
            pass

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


_OUTAGES: Final = (
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    PublishFailed,  # broker down, blocked, or no confirm in time
    TimeoutError,
    ConnectionError,
)
