"""Stripe event decoding and the dispatch table: event type -> handler."""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, TypeVar

import msgspec
from psycopg import AsyncConnection

from processor.context import Context

Outcome = Literal["applied", "ignored", "stale"]
T = TypeVar("T")


class EventData(msgspec.Struct, frozen=True):
    object: dict[str, Any]


class Event(msgspec.Struct, frozen=True):
    """A Stripe snapshot event; ``data.object`` stays a dict until a handler asks for a typed view."""

    id: str
    type: str
    created: int
    livemode: bool
    data: EventData
    api_version: str | None = None
    account: str | None = None

    def object(self, kind: builtins.type[T]) -> T:  # `type` is a field here
        return msgspec.convert(self.data.object, kind, strict=False)

    @property
    def object_id(self) -> str | None:
        value = self.data.object.get("id")
        return value if isinstance(value, str) else None


class Applied(msgspec.Struct, frozen=True):
    """What a handler did: its outcome and the user the event belongs to (when known)."""

    outcome: Outcome
    user_id: str | None = None


Handler = Callable[[AsyncConnection[Any], Event, Context], Awaitable[Applied]]

_decoder: Final = msgspec.json.Decoder(Event)


def decode_event(body: bytes) -> Event:
    return _decoder.decode(body)


def handlers() -> dict[str, Handler]:
    """The routing table; each family module contributes its own HANDLERS."""
    from processor.events import (
        charges,
        checkout,
        customers,
        disputes,
        invoices,
        payments,
        refunds,
        subscriptions,
    )

    table: dict[str, Handler] = {}
    for module in (payments, checkout, charges, refunds, disputes, customers, subscriptions, invoices):
        overlap = table.keys() & module.HANDLERS.keys()
        if overlap:
            raise RuntimeError(f"event types handled twice: {sorted(overlap)}")
        table.update(module.HANDLERS)
    return table
