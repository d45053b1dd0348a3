"""Payment request and reply messages (DESIGN §6): msgspec structs tagged by request kind.

A request is JSON published to `paybus.requests` with routing key = kind. The body carries the same
`kind` (a request is self-describing; the processor also accepts a body without it and takes the kind
from the routing key). The reply is `{"ok": true, "result": {...}}` or
`{"ok": false, "error": {"code", "message", "retryable"}}`; `result` is one of the *Result structs.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

# Stripe's own ceiling for an amount is eight digits in minor units; anything above is a bug upstream.
MAX_AMOUNT: Final = 99_999_999
# Stripe's documented minimum charge per currency (minor units). It is also the list of currencies
# paybus accepts for dynamic amounts: a currency without a known minimum is refused, not guessed.
MIN_AMOUNT: Final = {
    "inr": 50,
    "usd": 50,
    "eur": 50,
    "gbp": 30,
    "aud": 50,
    "cad": 50,
    "chf": 50,
    "sgd": 50,
    "jpy": 50,
    "nzd": 50,
    "sek": 300,
    "nok": 300,
    "dkk": 250,
    "hkd": 400,
    "mxn": 1000,
    "brl": 50,
    "aed": 200,
}

IdempotencyKey = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="client-chosen, unique per intent; printable ASCII",
    ),
]
Amount = Annotated[int, Meta(gt=0, le=MAX_AMOUNT, description="minor units (paise, cents)")]
Currency = Annotated[str, Meta(pattern=r"^[a-z]{3}$", description="ISO 4217, lower case")]
ProductKey = Annotated[str, Meta(min_length=1, max_length=100, description="catalog product key")]
Url = Annotated[str, Meta(pattern=r"^https?://", max_length=2000)]
StripeId = Annotated[str, Meta(min_length=3, max_length=255, pattern=r"^[a-z]+_[A-Za-z0-9_]+$")]
Metadata = Annotated[
    dict[Annotated[str, Meta(min_length=1, max_length=40)], Annotated[str, Meta(max_length=500)]],
    Meta(max_length=20, description="copied to the Stripe object's metadata (Stripe's key and value limits)"),
]
Email = Annotated[str, Meta(max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
Name = Annotated[str, Meta(min_length=1, max_length=200)]


class _Request(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, tag_field="kind"):
    idempotency_key: IdempotencyKey
    user_id: uuid.UUID


class _CustomerRequest(_Request, frozen=True, kw_only=True):
    # Kept on the user's Stripe customer (created on first use, updated when they change).
    email: Email | None = None
    name: Name | None = None


class CheckoutSessionCreate(_CustomerRequest, frozen=True, kw_only=True, tag="checkout_session.create"):
    """A Stripe Checkout Session for a catalog product, or a dynamic one-time amount."""

    mode: Literal["payment", "subscription"] | None = None
    product: ProductKey | None = None
    amount: Amount | None = None
    currency: Currency | None = None
    description: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    quantity: Annotated[int, Meta(ge=1, le=100)] = 1
    success_url: Url | None = None
    cancel_url: Url | None = None
    metadata: Metadata = {}


class PaymentIntentCreate(_CustomerRequest, frozen=True, kw_only=True, tag="payment_intent.create"):
    """A PaymentIntent the frontend confirms with Stripe.js (or at once with a saved payment method)."""

    amount: Amount
    currency: Currency | None = None
    product: ProductKey | None = None
    payment_method: StripeId | None = None
    confirm: bool = False
    metadata: Metadata = {}


class RefundCreate(_Request, frozen=True, kw_only=True, tag="refund.create"):
    """Refund (part of) one of the user's succeeded payments."""

    payment_id: uuid.UUID | None = None
    payment_intent_id: StripeId | None = None
    amount: Amount | None = None
    reason: Literal["duplicate", "fraudulent", "requested_by_customer"] | None = None


class PortalSessionCreate(_Request, frozen=True, kw_only=True, tag="portal_session.create"):
    """A Stripe billing portal session for the user's customer."""

    return_url: Url | None = None


class SubscriptionCancel(_Request, frozen=True, kw_only=True, tag="subscription.cancel"):
    subscription_id: StripeId
    at_period_end: bool = True


class SubscriptionChange(_Request, frozen=True, kw_only=True, tag="subscription.change"):
    """Switch a subscription to another catalog product (upgrade or downgrade)."""

    subscription_id: StripeId
    product: ProductKey
    proration_behavior: Literal["create_prorations", "none", "always_invoice"] = "create_prorations"


Request = (
    CheckoutSessionCreate
    | PaymentIntentCreate
    | RefundCreate
    | PortalSessionCreate
    | SubscriptionCancel
    | SubscriptionChange
)
REQUEST_TYPES: Final[tuple[type[_Request], ...]] = (
    CheckoutSessionCreate,
    PaymentIntentCreate,
    RefundCreate,
    PortalSessionCreate,
    SubscriptionCancel,
    SubscriptionChange,
)
KIND_OF: Final[dict[type[_Request], str]] = {t: str(t.__struct_config__.tag) for t in REQUEST_TYPES}
TYPE_OF: Final[dict[str, type[_Request]]] = {kind: t for t, kind in KIND_OF.items()}


class CheckoutSessionResult(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    url: str
    payment_id: str
    mode: str
    amount: int | None
    currency: str
    expires_at: int | None = None


class NextAction(msgspec.Struct, frozen=True, kw_only=True):
    """What Stripe.js needs to finish a PaymentIntent (3-D Secure): `stripe.handleNextAction`."""

    type: str
    redirect_url: str | None = None


class PaymentIntentResult(msgspec.Struct, frozen=True, kw_only=True):
    payment_intent_id: str
    client_secret: str
    publishable_key: str
    status: str
    payment_id: str
    amount: int
    currency: str
    next_action: NextAction | None = None


class RefundResult(msgspec.Struct, frozen=True, kw_only=True):
    refund_id: str
    status: str
    amount: int
    currency: str
    payment_id: str
    payment_intent_id: str
    amount_refunded: int


class PortalSessionResult(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    portal_session_id: str


class SubscriptionResult(msgspec.Struct, frozen=True, kw_only=True):
    subscription_id: str
    status: str
    cancel_at_period_end: bool
    product: str | None = None
    price_id: str | None = None
    current_period_end: int | None = None
    canceled_at: int | None = None


RESULT_OF: Final[dict[str, type[msgspec.Struct]]] = {
    "checkout_session.create": CheckoutSessionResult,
    "payment_intent.create": PaymentIntentResult,
    "refund.create": RefundResult,
    "portal_session.create": PortalSessionResult,
    "subscription.cancel": SubscriptionResult,
    "subscription.change": SubscriptionResult,
}

ErrorCode = Literal[
    "invalid_request",
    "not_found",
    "card_declined",
    "rate_limited",
    "stripe_unavailable",
    "stripe_error",
    "disabled",
    "internal_error",
]


class ReplyError(msgspec.Struct, frozen=True, kw_only=True):
    code: ErrorCode
    message: str
    retryable: bool = False
    decline_code: str | None = None


class Reply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The answer to every request; `result` is the *Result struct of the request's kind."""

    ok: bool
    result: dict[str, Any] | None = None
    error: ReplyError | None = None


def success(result: msgspec.Struct) -> Reply:
    return Reply(ok=True, result=msgspec.to_builtins(result))


def failure(
    code: ErrorCode, message: str, *, retryable: bool = False, decline_code: str | None = None
) -> Reply:
    return Reply(
        ok=False, error=ReplyError(code=code, message=message, retryable=retryable, decline_code=decline_code)
    )


_request_decoder: Final = msgspec.json.Decoder(Request)
_reply_decoder: Final = msgspec.json.Decoder(Reply)
_encoder: Final = msgspec.json.Encoder()


class InvalidRequest(ValueError):
    """The request cannot be understood; the message says precisely why (safe to send back)."""


def decode_request(body: bytes, routing_key: str | None = None) -> Request:
    """Decode and validate a request body; the kind comes from the body or else the routing key."""
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidRequest("a request must be a JSON object")
    if b"\\u0000" in body:
        raise InvalidRequest("strings must not contain NUL characters")
    kind = raw.get("kind", routing_key)
    if routing_key and routing_key in TYPE_OF and kind != routing_key:
        raise InvalidRequest(f"kind {kind!r} in the body does not match the routing key {routing_key!r}")
    if kind not in TYPE_OF:
        raise InvalidRequest(f"unknown request kind {kind!r}; known kinds: {', '.join(TYPE_OF)}")
    raw["kind"] = kind
    try:
        request: Request = msgspec.convert(raw, Request)
        return request
    except msgspec.ValidationError as exc:
        raise InvalidRequest(str(exc)) from None


def encode_request(request: Request) -> bytes:
    return _encoder.encode(request)


def kind_of(request: Request) -> str:
    return KIND_OF[type(request)]


def encode_reply(reply: Reply) -> bytes:
    return _encoder.encode(reply)


def decode_reply(body: bytes) -> Reply:
    return _reply_decoder.decode(body)
