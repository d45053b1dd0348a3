"""Requests end to end with the fake Stripe: checkout in both modes with realistic webhooks, `paybus request`,
100 concurrent duplicates, and a processor SIGKILLed with a request in flight.

localstripe has no Checkout Sessions, so the fake answers the session calls; the webhooks that complete
a session are built from Stripe's own example objects (shared/samples.py) carrying exactly what paybus
sent to Stripe, signed, and POSTed to the real ingress. One pair of services serves the whole module
(the SIGKILL test restarts the processor, so it runs last).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import psycopg
import pytest

from shared import samples
from shared.amqp import REQUESTS_QUEUE
from shared.client import PaymentsClient
from shared.messages import CheckoutSessionCreate, Reply
from tests.fakes.harness import PaybusWithFake, fake_stripe_fixture, paybus_with_fake  # noqa: F401
from tests.fakes.stripe_fake import FakeStripe
from tests.support import queue_depth, signed, unique, wait_for, wait_for_sync

pytestmark = pytest.mark.e2e
Conn = psycopg.AsyncConnection[tuple[Any, ...]]
SESSIONS = "/v1/checkout/sessions"


@pytest.fixture(scope="module", name="system")
def system_fixture(
    database: str, fake_stripe: FakeStripe, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PaybusWithFake]:
    with paybus_with_fake(database, fake_stripe, tmp_path_factory.mktemp("requests-checkout")) as system:
        yield system


@pytest.fixture(name="payments")
async def payments_fixture(system: PaybusWithFake) -> AsyncIterator[PaymentsClient]:
    async with await PaymentsClient.connect(system.amqp, reply_timeout=20) as client:
        yield client


async def deliver(system: PaybusWithFake, event_type: str, obj: dict[str, Any]) -> str:
    envelope = samples.event(event_type, obj)
    body, headers = signed(envelope)
    async with (
        aiohttp.ClientSession() as http,
        http.post(system.webhook_url, data=body, headers=headers) as resp,
    ):
        assert resp.status == 200, await resp.text()
    return str(envelope["id"])


def completed_session(
    call_params: dict[str, Any], session_id: str, amount: int | None, **links: Any
) -> dict[str, Any]:
    """checkout.session.completed's object: Stripe's example with what paybus sent to Stripe."""
    obj = samples.fixture("checkout.session")
    obj.update(
        id=session_id,
        mode=call_params["mode"],
        client_reference_id=call_params["client_reference_id"],
        customer=call_params["customer"],
        metadata=call_params["metadata"],
        amount_total=amount,
        amount_subtotal=amount,
        currency="inr",
        status="complete",
        payment_status="paid",
        url=None,
        created=int(time.time()),
        **links,
    )
    return obj


async def outcome(conn: Conn, event_id: str) -> str | None:
    cur = await conn.execute("SELECT outcome FROM stripe_events WHERE id = %s", (event_id,))
    row = await cur.fetchone()
    return str(row[0]) if row and row[0] else None


async def test_payment_checkout_returns_a_url_and_its_webhooks_complete_the_payment(
    system: PaybusWithFake, payments: PaymentsClient, conn: Conn
) -> None:
    user = str(uuid.uuid4())
    session = await payments.create_checkout_session(
        idempotency_key=unique("co-pay"), user_id=user, product="course_bundle"
    )
    assert session.url.startswith("https://checkout.stripe.com/c/pay/") and session.mode == "payment"
    sent = next(
        c for c in system.fake.calls_to("/v1/checkout/sessions") if c.params["client_reference_id"] == user
    )

    # The customer pays on Stripe's page; Stripe then sends these two events.
    intent_id = samples.new_id("pi")
    intent = samples.payment_intent(
        intent_id=intent_id, amount=299900, status="succeeded", customer=sent.params["customer"]
    )
    intent["metadata"] = sent.params["payment_intent_data"]["metadata"]
    completed = await deliver(
        system,
        "checkout.session.completed",
        completed_session(sent.params, session.session_id, 299900, payment_intent=intent_id),
    )
    succeeded = await deliver(system, "payment_intent.succeeded", intent)

    # Both say "paid" in the same second: whichever is applied second changes nothing and is `stale`.
    assert await wait_for(lambda: outcome(conn, succeeded)) in ("applied", "stale")
    assert await wait_for(lambda: outcome(conn, completed)) in ("applied", "stale")
    cur = await conn.execute(
        "SELECT user_id::text, status, amount, product FROM payments WHERE stripe_payment_intent_id = %s",
        (intent_id,),
    )
    assert await cur.fetchone() == (user, "succeeded", 299900, "course_bundle")  # mapped back by our metadata
    cur = await conn.execute(
        "SELECT user_id::text, mode, amount, product FROM payments WHERE id = %s", (session.payment_id,)
    )
    assert await cur.fetchone() == (user, "payment", 299900, "course_bundle")
    # one row for the session and its PaymentIntent, and the catalog's access for 365 days
    cur = await conn.execute(
        "SELECT count(*) FROM payments"
        " WHERE stripe_checkout_session_id = %s OR stripe_payment_intent_id = %s",
        (session.session_id, intent_id),
    )
    assert await cur.fetchone() == (1,)
    cur = await conn.execute(
        "SELECT feature, expires_at - granted_at > interval '364 days' FROM active_entitlements"
        " WHERE user_id = %s",
        (user,),
    )
    assert await cur.fetchall() == [("course:bundle", True)]


async def test_subscription_checkout_returns_a_url_and_its_webhooks_are_mapped_to_the_user(
    system: PaybusWithFake, payments: PaymentsClient, conn: Conn
) -> None:
    user = str(uuid.uuid4())
    session = await payments.create_checkout_session(
        idempotency_key=unique("co-sub"), user_id=user, product="pro_monthly", mode="subscription"
    )
    assert session.url.startswith("https://checkout.stripe.com/c/pay/") and session.mode == "subscription"
    sent = next(
        c for c in system.fake.calls_to("/v1/checkout/sessions") if c.params["client_reference_id"] == user
    )
    assert sent.params["line_items"][0]["price"] == "price_1PgafmB7WZ01zgkW6dKueIc5"

    subscription = samples.fixture("subscription")
    subscription.update(
        id=samples.new_id("sub"),
        customer=sent.params["customer"],
        status="active",
        metadata=sent.params["subscription_data"]["metadata"],
    )
    created = await deliver(system, "customer.subscription.created", subscription)
    completed = await deliver(
        system,
        "checkout.session.completed",
        completed_session(sent.params, session.session_id, 49900, subscription=subscription["id"]),
    )
    for event_id in (created, completed):
        assert await wait_for(lambda event_id=event_id: outcome(conn, event_id)) == "applied"
    assert (
        subscription["metadata"]["user_id"] == user and subscription["metadata"]["product"] == "pro_monthly"
    )
    cur = await conn.execute(
        "SELECT user_id::text, status, mode, product FROM payments WHERE stripe_checkout_session_id = %s",
        (session.session_id,),
    )
    assert await cur.fetchone() == (user, "succeeded", "subscription", "pro_monthly")
    cur = await conn.execute(
        "SELECT user_id::text, status, product FROM subscriptions WHERE id = %s", (subscription["id"],)
    )
    assert await cur.fetchone() == (user, "active", "pro_monthly")
    cur = await conn.execute("SELECT feature FROM active_entitlements WHERE user_id = %s ORDER BY 1", (user,))
    assert await cur.fetchall() == [("premium",), ("reports",)]


def test_paybus_request_prints_the_reply(system: PaybusWithFake) -> None:
    from tests.e2e.test_observability import _scrape

    before = _scrape(system.ingress.env["METRICS_PORT"])  # the stack is shared with other tests
    user, key = str(uuid.uuid4()), unique("cli")
    command = [
        str(Path(sys.executable).parent / "paybus"),
        "request",
        "checkout_session.create",
        "--user",
        user,
        "--key",
        key,
        "--amount",
        "25000",
        "--currency",
        "inr",
        "--description",
        "Workshop seat",
    ]
    first = subprocess.run(
        command, env=system.ingress.env, capture_output=True, text=True, timeout=60, check=False
    )
    assert first.returncode == 0, first.stderr
    reply = json.loads(first.stdout)
    assert reply["ok"] is True and reply["result"]["amount"] == 25000
    again = subprocess.run(
        command, env=system.ingress.env, capture_output=True, text=True, timeout=60, check=False
    )
    assert json.loads(again.stdout) == reply  # the same key, the same answer
    bad_command = [*command[:4], user, "--key", unique("cli"), "--amount=-5"]
    bad = subprocess.run(
        bad_command, env=system.ingress.env, capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 1
    error = json.loads(bad.stdout)["error"]
    assert error["code"] == "invalid_request" and "$.amount" in error["message"]

    # the processor's /metrics counted them: two answered ok (the second from the stored reply), one refused
    after = _scrape(system.ingress.env["METRICS_PORT"])

    def moved(name: str, labels: tuple[tuple[str, str], ...]) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    kind = ("kind", "checkout_session.create")
    assert moved("paybus_payment_requests_total", (kind, ("outcome", "ok"))) == 2
    assert moved("paybus_payment_requests_total", (kind, ("outcome", "invalid_request"))) == 1
    assert moved("paybus_stripe_api_seconds_count", (("operation", "checkout session create"),)) == 1


async def rows_for(conn: Conn, key: str, session_ids: set[str]) -> tuple[int, int]:
    requests = await (
        await conn.execute("SELECT count(*) FROM payment_requests WHERE idempotency_key = %s", (key,))
    ).fetchone()
    payments = await (
        await conn.execute(
            "SELECT count(*) FROM payments WHERE stripe_checkout_session_id = ANY(%s)", (list(session_ids),)
        )
    ).fetchone()
    assert requests is not None and payments is not None
    return int(requests[0]), int(payments[0])


async def test_100_concurrent_duplicates_make_one_stripe_object_and_100_identical_replies(
    system: PaybusWithFake, conn: Conn
) -> None:
    key = unique("race")
    request = CheckoutSessionCreate(idempotency_key=key, user_id=uuid.uuid4(), product="team_monthly")
    sessions_before = system.fake.created["checkout.session"]
    calls_before = len(system.fake.calls_to(SESSIONS))
    held = system.fake.hold_next(SESSIONS)  # the first Stripe call waits until every duplicate is queued
    clients = [await PaymentsClient.connect(system.amqp, reply_timeout=60) for _ in range(5)]
    try:
        calls = [asyncio.create_task(clients[i % 5].request(request)) for i in range(100)]
        # Every duplicate is either waiting on the row lock in the processor (16 at a time) or in the queue.
        await asyncio.to_thread(wait_for_sync, lambda: len(system.fake.calls_to(SESSIONS)) > calls_before)
        await wait_for(lambda: _is(queue_depth(system.amqp, REQUESTS_QUEUE), 100 - 16), timeout=20)
        assert len(system.fake.calls_to(SESSIONS)) - calls_before == 1 and not any(c.done() for c in calls)
        held.set()
        replies: list[Reply] = await asyncio.gather(*calls)
    finally:
        held.set()
        for client in clients:
            await client.close()

    assert len({msgspec.json.encode(r) for r in replies}) == 1, "every duplicate gets the same reply"
    assert replies[0].ok is True and replies[0].result is not None
    assert system.fake.created_per_key[f"paybus:{key}:checkout"] == 1
    assert system.fake.created["checkout.session"] - sessions_before == 1
    assert await rows_for(conn, key, {replies[0].result["session_id"]}) == (1, 1)


async def test_a_request_in_flight_when_the_processor_is_killed_is_answered_after_restart_with_one_object(
    system: PaybusWithFake, conn: Conn
) -> None:
    key = unique("killed")
    request = CheckoutSessionCreate(idempotency_key=key, user_id=uuid.uuid4(), product="pro_monthly")
    held = system.fake.hold_next(SESSIONS)
    async with await PaymentsClient.connect(system.amqp, reply_timeout=60) as client:
        pending = asyncio.create_task(client.request(request))
        # Stripe has made the session; the processor waits for the answer. Now it dies.
        await asyncio.to_thread(
            wait_for_sync, lambda: system.fake.created_per_key[f"paybus:{key}:checkout"] == 1
        )
        system.processor.kill()
        assert not pending.done()
        await asyncio.to_thread(system.start_processor)  # the broker redelivers the unacked request
        reply = await pending
    held.set()

    assert reply.ok is True and reply.result is not None
    calls = [c for c in system.fake.calls_to(SESSIONS) if c.key == f"paybus:{key}:checkout"]
    assert len(calls) == 2  # asked again after the restart, with the same Idempotency-Key
    assert system.fake.created_per_key[f"paybus:{key}:checkout"] == 1  # and Stripe made nothing new
    assert await rows_for(conn, key, {reply.result["session_id"]}) == (1, 1)
    cur = await conn.execute(
        "SELECT status, response FROM payment_requests WHERE idempotency_key = %s", (key,)
    )
    assert await cur.fetchone() == ("succeeded", msgspec.to_builtins(reply))


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
