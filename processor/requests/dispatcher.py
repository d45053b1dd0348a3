"""The work done for one payment-request message: validate, claim the key, call Stripe once, store, reply.

Idempotency end to end: the `payment_requests` row is claimed before anything else; its row lock is
held across the Stripe call and released by the COMMIT that stores the reply (and the local `payments`
row). Duplicates wait for that COMMIT and answer with the stored reply; a crash before it releases the
lock (Postgres ends the dead session's transaction) and the redelivered message calls Stripe again with
the same Idempotency-Key, which returns the object Stripe already made.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Final

import aio_pika
import msgspec
import psycopg
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from opentelemetry import context, trace
from opentelemetry.trace import SpanKind
from psycopg_pool import AsyncConnectionPool

from processor.consumer import CONFLICT_ERRORS, DB_DOWN_ERRORS
from processor.customers import ensure_customer
from processor.errors import DatabaseUnavailable, Retry
from processor.requests import handlers as request_handlers
from processor.requests import store
from processor.requests.base import Deps, Done, KindHandler, Refused
from processor.stripe_api import StripeFailure, StripeTransient
from shared.amqp import REQUEST_KINDS, REQUESTS_QUEUE
from shared.headers import H_ATTEMPTS, H_ORIGINAL_KEY
from shared.messages import InvalidRequest, Reply, Request, decode_request, failure, kind_of
from shared.telemetry import ProcessorMetrics, extract

log = logging.getLogger("paybus.requests")

# How long a duplicate waits for the delivery holding its key before handing back to the retry tiers.
LOCK_WAIT_S: Final = 30.0
# Errors the consumer itself handles (pause on database down, rerun on lock conflicts): never answered.
_PASS_THROUGH: Final = (DatabaseUnavailable, *DB_DOWN_ERRORS, *CONFLICT_ERRORS)


def params_hash(request: Request) -> str:
    return hashlib.sha256(msgspec.json.encode(msgspec.to_builtins(request), order="sorted")).hexdigest()


def _attempts(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


class RequestProcessor:
    """Callable work function for `Consumer` on `paybus.payment-requests`; always answers the requester."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        channel: AbstractChannel,
        deps: Deps,
        retry_delays_ms: tuple[int, ...],
        table: dict[str, KindHandler] | None = None,
        metrics: ProcessorMetrics | None = None,
    ) -> None:
        self._metrics = metrics or ProcessorMetrics()
        self._tracer = trace.get_tracer("paybus.processor")
        self._pool = pool
        self._channel = channel
        self._deps = deps
        self._tiers = len(retry_delays_ms)
        self._table = table or request_handlers()

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        token = context.attach(extract(message.headers))
        try:
            with self._tracer.start_as_current_span(
                f"request {message.routing_key if message.routing_key in REQUEST_KINDS else 'unknown'}",
                kind=SpanKind.CONSUMER,
            ):
                await self._answer(message)
        finally:
            context.detach(token)

    async def _answer(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        # After a retry tier the routing key is the queue's; the original one (the kind) is in a header.
        routing_key = _text(headers.get(H_ORIGINAL_KEY)) or message.routing_key
        if routing_key == REQUESTS_QUEUE:
            routing_key = None
        final = _attempts(headers.get(H_ATTEMPTS)) >= self._tiers
        try:
            reply = await self.process(message.body, routing_key)
        except _PASS_THROUGH:
            raise
        except StripeTransient as exc:
            if not final:
                raise
            reply = failure(exc.code, f"{exc}; retries exhausted, try again later", retryable=True)
        except Retry as exc:
            if not final:
                raise
            reply = failure("stripe_unavailable", f"{exc}; try again later", retryable=True)
        except Exception:
            if not final:
                raise  # the consumer's retry tiers apply
            # The hook that keeps a request from being dead-lettered silently: the requester is told.
            log.exception("payment request failed after every retry")
            reply = failure(
                "internal_error", "paybus could not process this request; try again later", retryable=True
            )
        outcome = "ok" if reply.ok else (reply.error.code if reply.error else "error")
        # only known kinds become label values: a routing key is chosen by the sender
        kind = routing_key if routing_key in REQUEST_KINDS else "unknown"
        self._metrics.requests.labels(kind, outcome).inc()
        await self._reply(message, reply)

    async def _reply(self, message: AbstractIncomingMessage, reply: Reply) -> None:
        if not message.reply_to:
            return  # fire-and-forget requests are still processed and stored
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                msgspec.json.encode(reply),
                correlation_id=message.correlation_id,
                content_type="application/json",
                type="paybus.reply",
            ),
            routing_key=message.reply_to,
            timeout=10,
        )

    async def process(self, body: bytes, routing_key: str | None = None) -> Reply:
        """The reply for one request body (stored replies are returned as they were)."""
        if not self._deps.settings.requests_enabled:
            return failure(
                "disabled",
                "payment requests are switched off (PAYBUS_REQUESTS_ENABLED=false)",
                retryable=True,
            )
        try:
            request = decode_request(body, routing_key)
            handler = self._table[kind_of(request)]
            handler.validate(request, self._deps)
        except InvalidRequest as exc:
            log.info("payment request rejected: %s", exc)
            return failure("invalid_request", str(exc))
        extra = {"request_kind": kind_of(request), "idempotency_key": request.idempotency_key}
        reply = await self._run(request, handler)
        log.info(
            "payment request answered: %s",
            "ok" if reply.ok else reply.error and reply.error.code,
            extra=extra,
        )
        return reply

    async def _run(self, request: Request, handler: KindHandler) -> Reply:
        key, kind, digest = request.idempotency_key, kind_of(request), params_hash(request)
        async with self._pool.connection() as conn:
            await store.claim(conn, key, kind, str(request.user_id), digest, msgspec.to_builtins(request))
            row = await store.peek(conn, key)
            if row is None or row.params_hash != digest:
                return _key_reused(key)
            if row.finished:
                return row.reply()
            customer_id = None
            if handler.needs_customer:
                try:
                    customer_id = await ensure_customer(
                        conn,
                        self._deps.stripe,
                        request.user_id,
                        getattr(request, "email", None),
                        getattr(request, "name", None),
                    )
                except StripeFailure as exc:
                    # Answered but not stored: nothing was done for this key, which stays open.
                    return _answer(exc)
            try:
                async with conn.transaction():
                    row = await store.lock(conn, key, LOCK_WAIT_S)
                    if row is None or row.params_hash != digest:
                        return _key_reused(key)
                    if row.finished:
                        return row.reply()  # a duplicate that waited for the winner's COMMIT
                    done = await self._handle(conn, request, handler, customer_id)
                    return await store.finish(conn, key, done.reply, done.stripe_object_id)
            except psycopg.errors.LockNotAvailable:
                raise Retry("another delivery of this request is still in progress") from None
            except _Answered as answered:
                return answered.reply  # a retryable refusal: answered, the key stays open

    async def _handle(
        self,
        conn: psycopg.AsyncConnection[Any],
        request: Request,
        handler: KindHandler,
        customer_id: str | None,
    ) -> Done:
        try:
            async with conn.transaction():  # savepoint: a refusal leaves no partial write
                return await handler.handle(conn, request, self._deps, customer_id)
        except StripeFailure as exc:
            reply = _answer(exc)
            if exc.retryable:
                raise _Answered(reply) from None
            return Done(reply)
        except Refused as exc:
            return Done(failure(exc.code, exc.message))


class _Answered(Exception):
    """A reply that must not be stored: the requester may retry the same key later."""

    def __init__(self, reply: Reply) -> None:
        super().__init__("answered")
        self.reply = reply


def _answer(exc: StripeFailure) -> Reply:
    return failure(exc.code, exc.message, retryable=exc.retryable, decline_code=exc.decline_code)


def _key_reused(key: str) -> Reply:
    return failure("invalid_request", f"idempotency_key {key!r} was already used for a different request")
