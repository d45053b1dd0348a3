"""Unique realistic Stripe events for the bench, built fast from one sample per type, and pre-signed.

Each type's sample (shared.samples, from Stripe's fixtures) is encoded once with placeholder ids; every
event is that template with fresh ids put in, so tens of thousands cost a fraction of a second and the
load generators never sign anything while they measure.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ingress.signature import signature_header
from processor.chains import ID_PREFIXES
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
    refs: tuple[str, ...] = ()  # the kinds of the other ids it names, each new per event (`ref0`, ...)

    def render(
        self, *, object_id: str, user_id: str, created: int, refs: Mapping[str, str] | None = None
    ) -> tuple[str, bytes]:
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
            **{f"ref{n}": f"{kind}_{os.urandom(12).hex()}" for n, kind in enumerate(self.refs)},
            **(refs or {}),
        }
        return event_id, (self.parts % values).encode()


def template(event_type: str, *, of_intent: bool = False) -> Template:
    """``of_intent``: a charge event naming a PaymentIntent, given as ``refs={"pi": ...}`` to `render`."""
    event = samples.sample_event(event_type, user_id=_USER, created=1000000001)
    obj = event["data"]["object"]
    if of_intent:
        obj["payment_intent"] = _PI
        obj["status"] = "failed" if event_type == "charge.failed" else "succeeded"
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
    # The fixture's other ids go too: a subscription's items name the fixture's subscription and an
    # invoice's lines its invoice (the object itself), and a subscription names its latest invoice.
    # Left as they are, every subscription of a batch, and every invoice, would share one id and so one
    # chain, applied one after the other. Ids of the object's own kind become the object's id; the
    # others a new id per event.
    others: dict[str, str] = {}
    obj.update(_own_ids(obj, prefix, others))
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
    for n, token in enumerate(others.values()):
        text = text.replace(token, f"%(ref{n})s")
    text = text.replace('"created":1000000001', '"created":%(created)d')
    return Template(event_type, prefix, text, tuple(fixture_id.split("_", 1)[0] for fixture_id in others))


_TOKENS: Final = (_EVT, _OBJ, _CH, _REQ, _PI, _CUS)


def _own_ids(value: Any, prefix: str, others: dict[str, str]) -> Any:
    """``value`` with every fixture id of a kind paybus keeps replaced (see `template`)."""
    if isinstance(value, dict):
        return {k: (v if k == "id" and v == _OBJ else _own_ids(v, prefix, others)) for k, v in value.items()}
    if isinstance(value, list):
        return [_own_ids(v, prefix, others) for v in value]
    if not isinstance(value, str) or value in _TOKENS or "_secret_" in value:
        return value
    kind, _, rest = value.partition("_")
    if kind not in ID_PREFIXES or not rest.isalnum():
        return value
    if kind == prefix:
        return _OBJ
    return others.setdefault(value, f"{kind}_BENCHREF{len(others)}BENCHREF")


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


# One "journey" of the drain mix: what a shop's event stream looks like. Most PaymentIntents are created
# and then succeed, some fail; Stripe sends each card attempt's charge event (charge.succeeded,
# charge.failed) beside the PaymentIntent's, naming it. Checkout, subscription, invoice, refund and
# customer events ride along.
JOURNEY: Final = (
    ("payment_intent.created", "charge.succeeded", "payment_intent.succeeded"),
    ("payment_intent.created", "charge.succeeded", "payment_intent.succeeded"),
    ("payment_intent.requires_action", "charge.failed", "payment_intent.payment_failed"),
    ("payment_intent.succeeded", "charge.succeeded"),
    ("checkout.session.completed",),
    ("customer.subscription.updated",),
    ("invoice.paid",),
    ("charge.refunded",),
    ("customer.created",),
)


def mixed(count: int) -> list[tuple[str, str, bytes]]:
    """``count`` events of the drain mix as (event id, type, body); a journey shares object and user,
    and a PaymentIntent's charge events name it."""
    templates = {
        (t, journey[0].startswith("payment_intent.") and t.startswith("charge.")): None
        for journey in JOURNEY
        for t in journey
    }
    built = {key: template(key[0], of_intent=key[1]) for key in templates}
    now = int(time.time())
    out: list[tuple[str, str, bytes]] = []
    while len(out) < count:
        for journey in JOURNEY:
            user = str(uuid.UUID(bytes=os.urandom(16), version=4))
            obj = object_id(built[journey[0], False].object_prefix)
            charge = object_id("ch")  # a PaymentIntent's charge: its events' id, its `latest_charge`
            for step, event_type in enumerate(journey):
                of_intent = journey[0].startswith("payment_intent.") and event_type.startswith("charge.")
                if of_intent:
                    event_id, body = built[event_type, True].render(
                        object_id=charge, user_id=user, created=now + step, refs={"pi": obj}
                    )
                else:
                    event_id, body = built[event_type, False].render(
                        object_id=obj, user_id=user, created=now + step, refs={"ch": charge}
                    )
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
