"""Unique realistic Stripe events for the bench, built fast from one sample per type, and pre-signed.

Each type's sample (shared.samples, from Stripe's fixtures) is encoded once with placeholder ids; every
event is that template with fresh ids put in, so tens of thousands cost a fraction of a second and the
load generators never sign anything while they measure.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ingress.signature import signature_header
from shared import samples

_EVT: Final = "evt_BENCHEVTBENCHEVTBENCHEV"
_OBJ: Final = "BENCHOBJBENCHOBJBENCHOB"
_CH: Final = "ch_BENCHCHGBENCHCHGBENCHCH"
_REQ: Final = "req_BENCHREQBENCHREQBENCHR"
_USER: Final = "00000000-0000-4000-8000-0000000bec44"
_PI: Final = "pi_BENCHPIBENCHPIBENCHPIBEN"
_CUS: Final = "cus_BENCHCUSBENCHCUSBENCHC"
PRODUCT: Final = "course_bundle"  # a one-time catalog product, so a success also grants an entitlement


@dataclass(frozen=True)
class Template:
    type: str
    object_prefix: str
    parts: str

    def render(self, *, object_id: str, user_id: str, created: int) -> tuple[str, bytes]:
        event_id = "evt_" + os.urandom(12).hex()
        values = {
            "evt": event_id,
            "obj": object_id,
            "ch": "ch_" + os.urandom(12).hex(),
            "req": "req_" + os.urandom(12).hex(),
            "pi": "pi_" + os.urandom(12).hex(),
            "cus": "cus_" + os.urandom(12).hex(),
            "user": user_id,
            "created": created,
        }
        return event_id, (self.parts % values).encode()


def template(event_type: str) -> Template:
    event = samples.sample_event(event_type, user_id=_USER, created=1000000001)
    obj = event["data"]["object"]
    prefix = str(obj["id"]).split("_", 1)[0]
    obj["id"] = _OBJ
    if event_type.startswith("payment_intent."):
        obj["client_secret"] = f"{_OBJ}_secret_{uuid.uuid4().hex[:24]}"
        obj["metadata"] = {"user_id": _USER, "product": PRODUCT}
        obj["created"] = 1000000001
        if obj.get("latest_charge"):
            obj["latest_charge"] = _CH
    # A reference the fixture names (the session's PaymentIntent, the customer of a subscription or
    # invoice) gets a new id per event too: with the fixture's one id every checkout would pile onto one
    # payment row and every subscription onto one customer, which no shop's stream looks like.
    if isinstance(obj.get("payment_intent"), str):
        obj["payment_intent"] = _PI
    if isinstance(obj.get("customer"), str):
        obj["customer"] = _CUS
    event["id"] = _EVT
    event["request"] = {"id": _REQ, "idempotency_key": _USER}
    text = samples.encode(event).decode().replace("%", "%%")
    for token, key in (
        (_EVT, "evt"),
        (_OBJ, "obj"),
        (_CH, "ch"),
        (_REQ, "req"),
        (_USER, "user"),
        (_PI, "pi"),
        (_CUS, "cus"),
    ):
        text = text.replace(token, f"%({key})s")
    text = text.replace('"created":1000000001', '"created":%(created)d')
    return Template(event_type, prefix, text)


def object_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(12).hex()}"


def succeeded(count: int, created: int | None = None) -> Iterator[bytes]:
    """``count`` payment_intent.succeeded events, each for its own PaymentIntent and user."""
    tpl = template("payment_intent.succeeded")
    created = created or int(time.time())
    for _ in range(count):
        yield tpl.render(
            object_id=object_id("pi"),
            user_id=str(uuid.UUID(bytes=os.urandom(16), version=4)),
            created=created,
        )[1]


# One "journey" of the drain mix: what a shop's event stream looks like (most PaymentIntents are created
# and then succeed; some fail; checkout, subscription, invoice, refund and customer events ride along).
JOURNEY: Final = (
    ("payment_intent.created", "payment_intent.succeeded"),
    ("payment_intent.created", "payment_intent.succeeded"),
    ("payment_intent.requires_action", "payment_intent.payment_failed"),
    ("payment_intent.succeeded",),
    ("checkout.session.completed",),
    ("customer.subscription.updated",),
    ("invoice.paid",),
    ("charge.refunded",),
    ("customer.created",),
)


def mixed(count: int) -> list[tuple[str, str, bytes]]:
    """``count`` events of the drain mix as (event id, type, body); a journey shares object and user."""
    templates = {t: template(t) for journey in JOURNEY for t in journey}
    now = int(time.time())
    out: list[tuple[str, str, bytes]] = []
    while len(out) < count:
        for journey in JOURNEY:
            user = str(uuid.UUID(bytes=os.urandom(16), version=4))
            obj = object_id(templates[journey[0]].object_prefix)
            for step, event_type in enumerate(journey):
                event_id, body = templates[event_type].render(object_id=obj, user_id=user, created=now + step)
                out.append((event_id, event_type, body))
    return out[:count]


def write_signed(path: Path, bodies: Iterator[bytes] | list[bytes], secret: str) -> int:
    """One ``signature<TAB>body`` line per event (compact JSON holds no raw tab or newline)."""
    now = int(time.time())
    count = 0
    with path.open("wb") as out:
        for body in bodies:
            out.write(signature_header(body, secret, now).encode() + b"\t" + body + b"\n")
            count += 1
    return count
