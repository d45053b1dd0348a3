"""The work done for one raw-event message: decode, then ledger + effect in one transaction."""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from psycopg_pool import AsyncConnectionPool

from processor.context import Context
from processor.errors import Reject
from processor.events import Handler
from processor.ledger import Result, apply_event, parse_event, record_failed
from processor.schema import unknown_schema
from shared.envelope import H_RECEIVED_AT


class EventPipeline:
    def __init__(self, pool: AsyncConnectionPool[Any], handlers: dict[str, Handler], ctx: Context) -> None:
        self._pool = pool
        self._handlers = handlers
        self._ctx = ctx

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        await self.process(message.body, _received_at(message))

    async def process(self, body: bytes, received_at: str | None = None) -> Result:
        event = parse_event(body)
        try:
            problem = unknown_schema(event.api_version)
            if problem:
                raise Reject("unknown-schema", problem)
            async with self._pool.connection() as conn, conn.transaction():
                return await apply_event(conn, body, event, self._handlers, self._ctx, received_at)
        except Reject:
            async with self._pool.connection() as conn:
                await record_failed(conn, body, event)
            raise


def _received_at(message: AbstractIncomingMessage) -> str | None:
    value = (message.headers or {}).get(H_RECEIVED_AT)
    if isinstance(value, bytes):
        value = value.decode()
    return value if isinstance(value, str) else None
