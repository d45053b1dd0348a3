"""Typed async client for backend services: publish a payment request, await its reply, raise typed errors.

    async with await PaymentsClient.connect("amqp://...") as payments:
        session = await payments.create_checkout_session(
            idempotency_key=f"order-{order.id}", user_id=user.id, product="pro_monthly")
        redirect(session.url)

Each client has one exclusive, server-named reply queue; replies are matched by correlation_id. The same
idempotency_key always yields the same answer, so after a `RequestTimeout` call again with the same key.
"""

from __future__ import annotations

import asyncio
import uuid
from types import TracebackType
from typing import Any, Final, TypeVar

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from pamqp.commands import Basic

from shared.amqp import REQUESTS_EXCHANGE
from shared.messages import (
    RESULT_OF,
    CheckoutSessionCreate,
    CheckoutSessionResult,
    PaymentIntentCreate,
    PaymentIntentResult,
    PortalSessionCreate,
    PortalSessionResult,
    RefundCreate,
    RefundResult,
    Reply,
    Request,
    SubscriptionCancel,
    SubscriptionChange,
    SubscriptionResult,
    decode_reply,
    encode_request,
    kind_of,
)

DEFAULT_TIMEOUT: Final = 30.0
R = TypeVar("R", bound=msgspec.Struct)
Seconds = float | None


class PaymentRequestError(Exception):
    """The processor answered `ok: false`; `code`, `message` and `retryable` are from the reply."""

    code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool = False,
        decline_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.retryable = retryable
        self.decline_code = decline_code


class InvalidRequestError(PaymentRequestError):
    code = "invalid_request"


class NotFoundError(PaymentRequestError):
    code = "not_found"


class CardDeclinedError(PaymentRequestError):
    code = "card_declined"


class RateLimitedError(PaymentRequestError):
    code = "rate_limited"


class StripeUnavailableError(PaymentRequestError):
    code = "stripe_unavailable"


class RequestsDisabledError(PaymentRequestError):
    code = "disabled"


class RequestTimeout(PaymentRequestError):
    """No reply in time. The request may still be processed: repeat it with the same idempotency_key."""

    code = "timeout"


_ERRORS: Final[dict[str, type[PaymentRequestError]]] = {
    cls.code: cls
    for cls in (
        InvalidRequestError,
        NotFoundError,
        CardDeclinedError,
        RateLimitedError,
        StripeUnavailableError,
        RequestsDisabledError,
    )
}


def raise_for(reply: Reply) -> None:
    if reply.ok:
        return
    error = reply.error
    if error is None:
        raise PaymentRequestError("reply has neither result nor error")
    cls = _ERRORS.get(error.code, PaymentRequestError)
    raise cls(error.message, code=error.code, retryable=error.retryable, decline_code=error.decline_code)


def _build(fields: dict[str, Any], request_type: type[R]) -> R:
    try:
        return msgspec.convert(fields, request_type)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(str(exc)) from None


class PaymentsClient:
    """Request/reply over `paybus.requests`; safe for many concurrent calls on one client."""

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        reply_timeout: float = DEFAULT_TIMEOUT,
        owns_connection: bool = False,
    ) -> None:
        self._connection = connection
        self._timeout = reply_timeout
        self._owns_connection = owns_connection
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._pending: dict[str, asyncio.Future[Reply]] = {}

    @classmethod
    async def connect(cls, amqp_url: str, *, reply_timeout: float = DEFAULT_TIMEOUT) -> PaymentsClient:
        connection = await aio_pika.connect_robust(
            amqp_url, client_properties={"connection_name": "paybus-client"}
        )
        client = cls(connection, reply_timeout=reply_timeout, owns_connection=True)
        try:
            await client.open()
        except BaseException:
            await connection.close()
            raise
        return client

    async def open(self) -> None:
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._queue = await self._channel.declare_queue("", exclusive=True, auto_delete=True)
        await self._queue.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        if self._channel is not None:
            await self._channel.close()
        if self._owns_connection:
            await self._connection.close()

    async def __aenter__(self) -> PaymentsClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            return  # a late reply to a call that timed out
        try:
            future.set_result(decode_reply(message.body))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            future.set_exception(PaymentRequestError(f"unreadable reply: {exc}"))

    async def send(self, kind: str, body: bytes, *, reply_timeout: float | None = None) -> Reply:
        """Publish a raw request body with routing key ``kind`` and wait for the reply."""
        if self._channel is None or self._queue is None:
            raise RuntimeError("PaymentsClient.open() not called")
        correlation_id = str(uuid.uuid4())
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            exchange = await self._channel.get_exchange(REQUESTS_EXCHANGE, ensure=False)
            confirmation = await exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    correlation_id=correlation_id,
                    reply_to=self._queue.name,
                    type=kind,
                ),
                routing_key=kind,
                timeout=reply_timeout or self._timeout,
            )
            if not isinstance(confirmation, Basic.Ack):
                raise StripeUnavailableError("the broker did not accept the request", retryable=True)
            return await asyncio.wait_for(future, reply_timeout or self._timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"no reply to {kind} within {reply_timeout or self._timeout}s", retryable=True
            ) from None
        finally:
            self._pending.pop(correlation_id, None)

    async def request(self, request: Request, *, reply_timeout: float | None = None) -> Reply:
        """The processor's reply to ``request`` (ok or not), without raising on `ok: false`."""
        return await self.send(kind_of(request), encode_request(request), reply_timeout=reply_timeout)

    async def call(self, request: Request, result_type: type[R], *, reply_timeout: float | None = None) -> R:
        reply = await self.request(request, reply_timeout=reply_timeout)
        raise_for(reply)
        assert result_type is RESULT_OF[kind_of(request)]
        return msgspec.convert(reply.result, result_type)

    async def create_checkout_session(
        self, *, reply_timeout: Seconds = None, **fields: Any
    ) -> CheckoutSessionResult:
        return await self.call(
            _build(fields, CheckoutSessionCreate), CheckoutSessionResult, reply_timeout=reply_timeout
        )

    async def create_payment_intent(
        self, *, reply_timeout: Seconds = None, **fields: Any
    ) -> PaymentIntentResult:
        return await self.call(
            _build(fields, PaymentIntentCreate), PaymentIntentResult, reply_timeout=reply_timeout
        )

    async def create_refund(self, *, reply_timeout: Seconds = None, **fields: Any) -> RefundResult:
        return await self.call(_build(fields, RefundCreate), RefundResult, reply_timeout=reply_timeout)

    async def create_portal_session(
        self, *, reply_timeout: Seconds = None, **fields: Any
    ) -> PortalSessionResult:
        return await self.call(
            _build(fields, PortalSessionCreate), PortalSessionResult, reply_timeout=reply_timeout
        )

    async def cancel_subscription(
        self, *, reply_timeout: Seconds = None, **fields: Any
    ) -> SubscriptionResult:
        return await self.call(
            _build(fields, SubscriptionCancel), SubscriptionResult, reply_timeout=reply_timeout
        )

    async def change_subscription(
        self, *, reply_timeout: Seconds = None, **fields: Any
    ) -> SubscriptionResult:
        return await self.call(
            _build(fields, SubscriptionChange), SubscriptionResult, reply_timeout=reply_timeout
        )
