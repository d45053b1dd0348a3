"""Two `paybus processor`s share one queue; events for the same objects arrive interleaved and duplicated.

Every object here belongs to one customer whose user mapping arrives somewhere in the middle, so
the customer lock, the payment-key locks and the checkout/PaymentIntent merge are all contended.
The end state must be the in-order one, with nothing dead-lettered and no event failed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from shared import samples
from shared.amqp import DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, EVENTS_QUEUE
from tests.conftest import env_for
from tests.integration.domain_helpers import Conn, rows, user
from tests.support import Service, queue_depth, wait_for

PAYMENTS = 8
SUBSCRIPTIONS = 3


def lifecycle_events(u: str, cus: str, t: int) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    events: list[dict[str, Any]] = [
        samples.event("customer.created", samples.customer(customer_id=cus, user_id=u), created=t)
    ]
    intents = [samples.new_id("pi") for _ in range(PAYMENTS)]
    for number, pi in enumerate(intents):
        ch = samples.new_id("ch")

        def intent(status: str, pi: str = pi) -> dict[str, Any]:
            return samples.payment_intent(intent_id=pi, customer=cus, status=status, product="course_bundle")

        events += [
            samples.event("payment_intent.created", intent("requires_payment_method"), created=t),
            samples.event("payment_intent.payment_failed", intent("requires_payment_method"), created=t),
            samples.event("payment_intent.succeeded", intent("succeeded"), created=t),
            samples.event(
                "charge.succeeded", samples.charge(charge_id=ch, intent_id=pi, customer=cus), created=t
            ),
            samples.event("refund.created", samples.refund(charge_id=ch, amount=10000), created=t + 1),
            samples.event(
                "charge.refunded",
                samples.charge(charge_id=ch, intent_id=pi, customer=cus, amount_refunded=10000),
                created=t + 1,
            ),
        ]
        if number % 2 == 0:  # half were bought through Checkout: session and PaymentIntent share one row
            events.append(
                samples.event(
                    "checkout.session.completed",
                    samples.checkout_session(intent_id=pi, customer=cus, product="course_bundle"),
                    created=t,
                )
            )
    subs = [samples.new_id("sub") for _ in range(SUBSCRIPTIONS)]
    for sub in subs:

        def subscription(status: str, sub: str = sub, **extra: Any) -> dict[str, Any]:
            return samples.subscription(
                subscription_id=sub, customer=cus, status=status, period_start=t, **extra
            )

        events += [
            samples.event(
                "customer.subscription.created", subscription("trialing", trial_end=t + 1), created=t
            ),
            samples.event("customer.subscription.updated", subscription("active"), created=t),
            samples.event("customer.subscription.updated", subscription("past_due"), created=t),
            samples.event(
                "invoice.payment_failed",
                samples.invoice(subscription_id=sub, customer=cus, status="open"),
                created=t,
            ),
            samples.event("customer.subscription.updated", subscription("active"), created=t + 1),
            samples.event(
                "customer.subscription.deleted", subscription("canceled", canceled_at=t + 2), created=t + 2
            ),
        ]
    return events, intents, subs


@pytest.mark.e2e
async def test_two_processors_on_one_queue_reach_the_in_order_state(
    conn: Conn, database: str, make_vhost: Callable[[], str], tmp_path: Path
) -> None:
    amqp = make_vhost()
    u, cus, t = user(), samples.new_id("cus"), int(time.time())
    events, intents, subs = lifecycle_events(u, cus, t)
    rng = random.Random(20261126)  # a fixed interleaving; which processor takes what still varies
    deliveries = events + rng.sample(events, len(events) // 3)  # a third delivered twice
    rng.shuffle(deliveries)
    envs = [env_for(database, amqp, PROCESSOR_PREFETCH="16") for _ in range(2)]
    processors = [Service("processor", env, tmp_path / f"p{n}.log").start() for n, env in enumerate(envs)]
    try:
        for processor, env in zip(processors, envs, strict=True):
            processor.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz")
        connection = await aio_pika.connect(amqp)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            queue = await channel.declare_queue(EVENTS_QUEUE, passive=True)
            assert queue.declaration_result.consumer_count == 2  # deliveries alternate between them
            exchange = await channel.get_exchange(EVENTS_EXCHANGE)
            for envelope in deliveries:
                await exchange.publish(
                    aio_pika.Message(samples.encode(envelope), content_type="application/json"),
                    routing_key=envelope["type"],
                )
        ids = [e["id"] for e in events]

        async def all_processed() -> bool:
            done = await rows(
                conn, "SELECT outcome FROM stripe_events WHERE id = ANY(%s) AND outcome IS NOT NULL", ids
            )
            return len(done) == len(ids)

        await wait_for(all_processed, timeout=90)
        for processor in processors:
            assert processor.proc is not None and processor.proc.poll() is None, processor.log()[-2000:]
    finally:
        logs = [p.log() for p in processors]
        for processor in processors:
            processor.stop()
    outcomes = await rows(
        conn, "SELECT outcome, count(*) FROM stripe_events WHERE id = ANY(%s) GROUP BY outcome", ids
    )
    assert {r["outcome"] for r in outcomes} <= {"applied", "stale"}, outcomes
    assert await queue_depth(amqp, DEAD_LETTER_QUEUE) == 0
    for log in logs:
        assert "UniqueViolation" not in log and "DeadlockDetected" not in log and "Traceback" not in log, log[
            -3000:
        ]

    payments = await rows(
        conn,
        "SELECT stripe_payment_intent_id, stripe_checkout_session_id, status, amount_refunded,"
        " user_id::text FROM payments WHERE stripe_customer_id = %s",
        cus,
    )
    assert sorted(p["stripe_payment_intent_id"] for p in payments) == sorted(intents)  # one row per payment
    assert sum(p["stripe_checkout_session_id"] is not None for p in payments) == PAYMENTS // 2
    assert {(p["status"], p["amount_refunded"], p["user_id"]) for p in payments} == {("succeeded", 10000, u)}
    subscriptions = await rows(
        conn, "SELECT id, status, user_id::text FROM subscriptions WHERE stripe_customer_id = %s", cus
    )
    assert sorted((s["id"], s["status"], s["user_id"]) for s in subscriptions) == sorted(
        (sub, "canceled", u) for sub in subs
    )
    active = await rows(
        conn, "SELECT feature, source_type FROM entitlements WHERE user_id = %s AND active", u
    )
    assert (
        sorted((a["feature"], a["source_type"]) for a in active) == [("course:bundle", "payment")] * PAYMENTS
    )
