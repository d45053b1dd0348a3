"""The work done for one raw-event message: decode, then ledger + effect in one transaction."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from psycopg_pool import AsyncConnectionPool

from processor.context import Context
from processor.errors import Reject
from processor.events import Handler
from processor.ledger import Result, apply_event, parse_event, record_failed, transaction
from processor.schema import unknown_schema
from shared.envelope import H_RECEIVED_AT
from shared.telemetry import ProcessorMetrics, extract


class EventPipeline:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        handlers: dict[str, Handler],
        ctx: Context,
        metrics: ProcessorMetrics | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.pool = pool
        self.handlers = handlers
        self.ctx = ctx
        self._metrics = metrics or ProcessorMetrics()
        self.tracer = tracer or trace.get_tracer("paybus.processor")

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        # queue.iterator() bypasses any consume-callback instrumentation: continue the trace by hand
        token = context.attach(extract(message.headers))
        try:
            with self.tracer.start_as_current_span(
                f"process {message.type or 'event'}", kind=SpanKind.CONSUMER
            ) as span:
                span.set_attributes(
                    {"messaging.system": "rabbitmq", "messaging.destination.name": message.routing_key or ""}
                )
                await self.process(message.body, received_at_of(message))
        finally:
            context.detach(token)

    async def process(self, body: bytes, received_at: str | None = None) -> Result:
        started = time.perf_counter()
        event = parse_event(body)
        span = trace.get_current_span()
        span.set_attributes({"stripe.event_id": event.id, "stripe.event_type": event.type})
        try:
            problem = unknown_schema(event.api_version)
            if problem:
                raise Reject("unknown-schema", problem)
            with self.tracer.start_as_current_span("db apply_event", kind=SpanKind.CLIENT) as db_span:
                db_span.set_attributes({"db.system": "postgresql", "db.operation": "transaction"})
                async with self.pool.connection() as conn, transaction(conn):
                    result = await apply_event(conn, body, event, self.handlers, self.ctx, received_at)
                db_span.set_attribute("paybus.outcome", result)
        except Reject:
            self._metrics.events.labels(event.type, "failed").inc()
            span.set_status(Status(StatusCode.ERROR, "rejected"))
            async with self.pool.connection() as conn:
                await record_failed(conn, body, event)
            raise
        self.observe(event.type, result, time.perf_counter() - started, received_at)
        return result

    def observe(self, event_type: str, result: Result, seconds: float, received_at: str | None) -> None:
        """Count one committed event: outcome, time spent, and lag since the ingress received it."""
        self._metrics.events.labels(event_type, result).inc()
        self._metrics.processing_seconds.observe(seconds)
        if received_at and result != "duplicate":
            lag = (datetime.now(UTC) - datetime.fromisoformat(received_at)).total_seconds()
            self._metrics.lag_seconds.observe(max(lag, 0.0))


def received_at_of(message: AbstractIncomingMessage) -> str | None:
    value = (message.headers or {}).get(H_RECEIVED_AT)
    if isinstance(value, bytes):
        value = value.decode()
    if not isinstance(value, str):
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return None  # a bad header must not make an otherwise good event fail
    return value
