"""Realistic Stripe event histories for many users, and the state that in-order delivery must give.

Each family turns a user into a list of snapshot events (each with its `created` time) plus a
reference model of the final state, written independently of the processor's SQL. Only
PaymentIntents exist on this branch; subscription, invoice, checkout, refund and dispute families
plug in the same way: a class with `events(rng, user_id, start)` and `check(conn)`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg

from shared import samples

# DESIGN §9.2: ties on `created` are broken by lifecycle rank; succeeded and canceled are terminal.
PI_RANK = {"open": 0, "requires_action": 1, "processing": 2, "failed": 3, "canceled": 4, "succeeded": 5}
PI_TERMINAL = {"succeeded", "canceled"}
PI_STATUS_BY_EVENT = {
    "payment_intent.created": "open",
    "payment_intent.requires_action": "requires_action",
    "payment_intent.processing": "processing",
    "payment_intent.succeeded": "succeeded",
    "payment_intent.payment_failed": "failed",
    "payment_intent.canceled": "canceled",
}
_SCENARIOS: dict[str, list[list[str]]] = {
    "pays": [
        ["created", "processing", "succeeded"],
        ["created", "requires_action", "processing", "succeeded"],
    ],
    "declined then pays": [
        ["created", "payment_failed", "processing", "succeeded"],
        ["created", "payment_failed", "payment_failed", "requires_action", "processing", "succeeded"],
    ],
    "gives up": [["created", "payment_failed", "canceled"], ["created", "requires_action", "canceled"]],
    "declined": [["created", "payment_failed"], ["created", "payment_failed", "payment_failed"]],
}


class Family(Protocol):
    name: str

    def events(self, rng: random.Random, user_id: str, start: int) -> list[dict[str, Any]]: ...

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> list[str]: ...


@dataclass
class ExpectedIntent:
    user_id: str
    amount: int
    key: tuple[bool, int, int] = (False, -1, -1)
    status: str = ""

    def see(self, status: str, created: int) -> None:
        """Apply the ordering rule: the greatest (terminal, created, rank) wins."""
        key = (status in PI_TERMINAL, created, PI_RANK[status])
        if key > self.key:
            self.key, self.status = key, status


@dataclass
class PaymentIntents:
    """Several PaymentIntents per user: paid, declined then paid, abandoned, declined."""

    name: str = "payment_intent"
    per_user: tuple[int, int] = (3, 6)
    expected: dict[str, ExpectedIntent] = field(default_factory=dict)

    def events(self, rng: random.Random, user_id: str, start: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(rng.randint(*self.per_user)):
            intent_id = samples.new_id("pi")
            amount = rng.choice([9900, 49900, 149900, 29900])
            product = rng.choice(["course_bundle", None])
            steps = rng.choice(_SCENARIOS[rng.choice(list(_SCENARIOS))])
            expected = self.expected[intent_id] = ExpectedIntent(user_id, amount)
            created = start + rng.randint(0, 3600)
            for step in steps:
                created += rng.choice([0, 1, 1, 2, 5, 30])  # same-second ties happen
                event_type = f"payment_intent.{step}"
                status = PI_STATUS_BY_EVENT[event_type]
                obj = samples.payment_intent(
                    intent_id=intent_id,
                    amount=amount,
                    user_id=user_id,
                    product=product,
                    status={"open": "requires_payment_method", "failed": "requires_payment_method"}.get(
                        status, status
                    ),
                )
                if status == "failed":
                    obj["last_payment_error"] = {
                        "type": "card_error",
                        "code": "card_declined",
                        "decline_code": rng.choice(["generic_decline", "insufficient_funds"]),
                    }
                out.append(samples.event(event_type, obj, created=created))
                expected.see(status, created)
        return out

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> list[str]:
        cur = await conn.execute(
            "SELECT stripe_payment_intent_id, status, user_id::text, amount FROM payments"
            " WHERE stripe_payment_intent_id = ANY(%s)",
            (list(self.expected),),
        )
        rows = {r[0]: r[1:] for r in await cur.fetchall()}
        problems = []
        for intent_id, want in self.expected.items():
            got = rows.get(intent_id)
            if got != (want.status, want.user_id, want.amount):
                problems.append(
                    f"{intent_id}: expected {(want.status, want.user_id, want.amount)}, got {got}"
                )
        return problems


def generate(families: list[Family], users: int, seed: int, start: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)  # noqa: S311 - test data
    events: list[dict[str, Any]] = []
    for _ in range(users):
        user_id = f"{rng.getrandbits(32):08x}-0000-4000-8000-{rng.getrandbits(48):012x}"
        for family in families:
            events.extend(family.events(rng, user_id, start))
    return events
