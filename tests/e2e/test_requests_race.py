"""Idempotency under pressure: 100 concurrent duplicates; a processor SIGKILLed with a request in flight."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any

import msgspec
import psycopg
import pytest

from shared.amqp import REQUESTS_QUEUE
from shared.client import PaymentsClient
from shared.messages import CheckoutSessionCreate, Reply
from tests.fakes.harness import PaybusWithFake, fake_stripe_fixture, paybus_with_fake  # noqa: F401
from tests.fakes.stripe_fake import FakeStripe
from tests.support import queue_depth, unique, wait_for, wait_for_sync

pytestmark = pytest.mark.e2e
Conn = psycopg.AsyncConnection[tuple[Any, ...]]
SESSIONS = "/v1/checkout/sessions"


@pytest.fixture(scope="module", name="system")
def system_fixture(
    database: str, fake_stripe: FakeStripe, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PaybusWithFake]:
    with paybus_with_fake(database, fake_stripe, tmp_path_factory.mktemp("requests-race")) as system:
        yield system


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
