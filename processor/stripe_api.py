"""Outgoing Stripe calls: one async StripeClient, pinned version, explicit retries and timeouts, typed errors.

Every create/update carries a deterministic Idempotency-Key chosen by the caller, so a call repeated after
a crash, a redelivery or a retry tier returns the object Stripe made the first time. Stripe errors become
either `StripeFailure` (a definite answer for the requester) or `StripeTransient` (a `Retry`: try again
later through the retry queues; after the last tier the requester is told `stripe_unavailable`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp
import stripe
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from processor.errors import Retry
from shared.config import Settings
from shared.logs import redact
from shared.messages import ErrorCode
from shared.telemetry import ProcessorMetrics

log = logging.getLogger("paybus.stripe")

# The SDK's own retries (connection errors, 409, 5xx, Stripe-Should-Retry) with its jittered backoff.
# A StripeClient built without this argument does not retry at all, so it is always given.
MAX_NETWORK_RETRIES: Final = 2
TIMEOUT: Final = aiohttp.ClientTimeout(total=30, connect=5)

StripeObject = dict[str, Any]


class StripeFailure(Exception):
    """Stripe gave a definite answer that is not success; it goes back to the requester as it is."""

    def __init__(
        self, code: ErrorCode, message: str, *, retryable: bool = False, decline_code: str | None = None
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.retryable = retryable
        self.decline_code = decline_code


class StripeTransient(Retry):
    """Stripe could not be reached or asked us to slow down: retry later; `code` is the final answer."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code


def _error_body(exc: stripe.StripeError) -> dict[str, Any]:
    body = exc.json_body.get("error") if isinstance(exc.json_body, dict) else None
    return body if isinstance(body, dict) else {}


def _message(exc: stripe.StripeError, fallback: str) -> str:
    text = exc.user_message or fallback
    return redact(str(text))[:300]


def classify(exc: stripe.StripeError) -> StripeFailure | StripeTransient:
    """Map an SDK error to what the requester is told (DESIGN §6 codes); never the raw internals."""
    status = exc.http_status or 0
    if isinstance(exc, stripe.APIConnectionError):
        return StripeTransient("stripe_unavailable", "Stripe could not be reached")
    if isinstance(exc, stripe.RateLimitError) or status == 429:
        return StripeTransient("rate_limited", "Stripe is rate limiting requests")
    if (
        status >= 500
        or isinstance(exc, stripe.APIError)
        or status == 409
        or exc.code == "idempotency_key_in_use"
    ):
        return StripeTransient("stripe_unavailable", f"Stripe answered {status or 'an API error'}")
    if isinstance(exc, stripe.CardError):
        body = _error_body(exc)
        return StripeFailure(
            "card_declined",
            _message(exc, "the card was declined"),
            decline_code=body.get("decline_code") or exc.code,
        )
    if isinstance(exc, stripe.IdempotencyError):
        return StripeFailure("invalid_request", "Stripe saw this idempotency key with different parameters")
    if isinstance(exc, (stripe.AuthenticationError, stripe.PermissionError)):
        # A configuration problem on our side: the requester may retry once an operator fixed it.
        return StripeFailure(
            "stripe_error", "paybus is not authorised at Stripe; try again later", retryable=True
        )
    if isinstance(exc, stripe.InvalidRequestError):
        if status == 404 or exc.code == "resource_missing":
            param = getattr(exc, "param", None)
            return StripeFailure("not_found", f"Stripe has no such {param or 'object'}")
        raw = str(_error_body(exc).get("message") or exc.code or "invalid request")
        return StripeFailure("invalid_request", f"Stripe rejected the request: {redact(raw)[:300]}")
    return StripeFailure("stripe_error", f"Stripe error ({type(exc).__name__})")


def _params(params: dict[str, Any]) -> Any:
    """The SDK types its params as TypedDicts; ours are built as plain dicts."""
    return params


class StripeApi:
    """The handful of Stripe calls payment requests make; every result is a plain dict."""

    def __init__(
        self, client: stripe.StripeClient, http: stripe.AIOHTTPClient, metrics: ProcessorMetrics | None = None
    ) -> None:
        self._client = client
        self._http = http
        self._metrics = metrics or ProcessorMetrics()
        self._tracer = trace.get_tracer("paybus.stripe")

    @classmethod
    def from_settings(cls, settings: Settings, metrics: ProcessorMetrics | None = None) -> StripeApi:
        http = stripe.AIOHTTPClient(timeout=TIMEOUT)
        client = stripe.StripeClient(
            settings.stripe_secret_key,
            stripe_version=settings.stripe_api_version or None,  # None = the SDK's pinned version
            base_addresses={"api": settings.stripe_api_base},
            max_network_retries=MAX_NETWORK_RETRIES,
            http_client=http,
        )
        return cls(client, http, metrics)

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def _call(self, what: str, call: Callable[[], Awaitable[Any]]) -> StripeObject:
        started = time.perf_counter()
        try:
            with self._tracer.start_as_current_span(f"stripe {what}", kind=SpanKind.CLIENT) as span:
                span.set_attribute("rpc.system", "stripe")
                obj = await call()
        except stripe.StripeError as exc:
            mapped = classify(exc)
            self._metrics.stripe_errors.labels(what, mapped.code).inc()
            log.warning(
                "stripe %s failed: %s http=%s code=%s request=%s -> %s",
                what,
                type(exc).__name__,
                exc.http_status,
                exc.code,
                exc.request_id,
                mapped.code,
            )
            raise mapped from None
        finally:
            self._metrics.stripe_seconds.labels(what).observe(time.perf_counter() - started)
        result: StripeObject = obj.to_dict()
        return result

    @staticmethod
    def _options(key: str | None) -> Any:
        return {"idempotency_key": key} if key else {}

    async def create_customer(self, params: dict[str, Any], key: str) -> StripeObject:
        v1 = self._client.v1
        return await self._call(
            "customer create", lambda: v1.customers.create_async(_params(params), self._options(key))
        )

    async def update_customer(self, customer_id: str, params: dict[str, Any], key: str) -> StripeObject:
        v1 = self._client.v1
        return await self._call(
            "customer update",
            lambda: v1.customers.update_async(customer_id, _params(params), self._options(key)),
        )

    async def create_checkout_session(self, params: dict[str, Any], key: str) -> StripeObject:
        v1 = self._client.v1
        return await self._call(
            "checkout session create",
            lambda: v1.checkout.sessions.create_async(_params(params), self._options(key)),
        )

    async def create_payment_intent(self, params: dict[str, Any], key: str) -> StripeObject:
        v1 = self._client.v1
        return await self._call(
            "payment intent create",
            lambda: v1.payment_intents.create_async(_params(params), self._options(key)),
        )

    async def create_refund(self, params: dict[str, Any], key: str) -> StripeObject:
        v1 = self._client.v1
        return await self._call(
            "refund create", lambda: v1.refunds.create_async(_params(params), self._options(key))
        )

    async def create_portal_session(self, params: dict[str, Any], key: str) -> StripeObject:
        v1 = self._client.v1
        return await self._call(
            "portal session create",
            lambda: v1.billing_portal.sessions.create_async(_params(params), self._options(key)),
        )

    async def retrieve_subscription(self, subscription_id: str) -> StripeObject:
        v1 = self._client.v1
        return await self._call(
            "subscription retrieve", lambda: v1.subscriptions.retrieve_async(subscription_id)
        )

    async def update_subscription(
        self, subscription_id: str, params: dict[str, Any], key: str
    ) -> StripeObject:
        v1 = self._client.v1
        return await self._call(
            "subscription update",
            lambda: v1.subscriptions.update_async(subscription_id, _params(params), self._options(key)),
        )

    async def cancel_subscription(self, subscription_id: str, key: str) -> StripeObject:
        v1 = self._client.v1
        return await self._call(
            "subscription cancel",
            lambda: v1.subscriptions.cancel_async(subscription_id, {}, self._options(key)),
        )
