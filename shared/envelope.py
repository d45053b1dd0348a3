"""The few fields of a Stripe event that routing needs, decoded without touching the rest."""

from __future__ import annotations

from typing import Final

import msgspec

# AMQP header names carried by every raw-event message (DESIGN §5).
H_EVENT_ID: Final = "stripe-event-id"
H_ACCOUNT: Final = "stripe-account"
H_LIVEMODE: Final = "livemode"
H_RECEIVED_AT: Final = "received-at"
H_TRACEPARENT: Final = "traceparent"


class Envelope(msgspec.Struct, frozen=True):
    id: str
    type: str
    created: int
    livemode: bool
    object: str = "event"
    api_version: str | None = None
    account: str | None = None


class NotAnEvent(ValueError):
    """The bytes are not a Stripe snapshot event."""


_decoder: Final = msgspec.json.Decoder(Envelope)


def decode_envelope(body: bytes) -> Envelope:
    try:
        env = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise NotAnEvent(f"not a Stripe event: {exc}") from None
    if env.object != "event":
        raise NotAnEvent(f"not a Stripe snapshot event (object={env.object!r})")
    if not env.id.startswith("evt_") or not env.type or "." not in env.type or len(env.id) > 255:
        raise NotAnEvent("not a Stripe event: bad id or type")
    if len(env.type) > 255 or env.created <= 0:
        raise NotAnEvent("not a Stripe event: bad type or created")
    return env
