"""Payment requests over RabbitMQ: the consumer, the typed client, replies, retry tiers, no reply_to."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from processor.catalog import load_catalog
from processor.consumer import Consumer, Forwarder
from processor.requests import handlers as request_handlers
from processor.requests.base import Deps, Done, KindHandler, no_checks
from processor.requests.dispatcher import RequestProcessor
from processor.requests.runner import RequestService, open_request_service
from processor.stripe_api import StripeApi
from shared.amqp import DEAD_LETTER_QUEUE, REQUESTS_EXCHANGE, REQUESTS_QUEUE, declare_topology, topology
from shared.client import (
    InvalidRequestError,
    NotFoundError,
    PaymentsClient,
    RequestTimeout,
    StripeUnavailableError,
)
from shared.messages import CheckoutSessionResult, RefundCreate
from tests.fakes.harness import fake_stripe_fixture, new_key, new_user, request_settings  # noqa: F401
from tests.fakes.stripe_fake import FakeStripe
from tests.support import create_vhost, delete_vhost, queue_depth, unique, wait_for

Conn = psycopg.AsyncConnection[tuple[Any, ...]]


class Running:
    def __init__(self, amqp: str, service: RequestService, task: asyncio.Task[None]) -> None:
        self.amqp, self.service, self.task = amqp, service, task


@pytest.fixture(scope="module")
def module_vhost() -> Iterator[str]:
    """One vhost for this module: creating vhosts is slow, and only these tests use it."""
    name = unique("paybus_requests")
    yield create_vhost(name)
    delete_vhost(name)


@pytest.fixture(scope="module")
async def running(database: str, module_vhost: str, fake_stripe: FakeStripe) -> AsyncIterator[Running]:
    amqp = module_vhost
    settings = request_settings(database, amqp, fake_stripe.url)
    connection = await aio_pika.connect_robust(amqp)
    channel = await connection.channel()
    await declare_topology(channel, topology(settings.retry_delays_ms))
    service = await open_request_service(settings, connection, load_catalog(settings.catalog_path))
    task = asyncio.create_task(service.consumer.run())
    try:
        yield Running(amqp, service, task)
    finally:
        await service.consumer.stop()
        task.cancel()
        await service.close()
        await connection.close()


async def test_typed_client_gets_a_typed_result(running: Running) -> None:
    async with await PaymentsClient.connect(running.amqp, reply_timeout=15) as client:
        session = await client.create_checkout_session(
            idempotency_key=new_key(), user_id=new_user(), product="pro_monthly"
        )
    assert isinstance(session, CheckoutSessionResult)
    assert session.mode == "subscription" and session.url.startswith("https://checkout.stripe.com/")


async def test_typed_client_raises_typed_errors(running: Running, conn: Conn) -> None:
    async with await PaymentsClient.connect(running.amqp, reply_timeout=15) as client:
        with pytest.raises(InvalidRequestError) as invalid:
            await client.create_payment_intent(
                idempotency_key=new_key(), user_id=new_user(), amount=5000, currency="xyz"
            )
        assert "unsupported currency 'xyz'" in invalid.value.message and invalid.value.retryable is False
        with pytest.raises(NotFoundError):
            await client.create_refund(
                idempotency_key=new_key(), user_id=new_user(), payment_intent_id="pi_doesnotexist"
            )
        with pytest.raises(InvalidRequestError):  # checked before anything is sent
            await client.create_payment_intent(idempotency_key=new_key(), user_id="not-a-uuid", amount=5000)


async def test_an_unknown_kind_reaches_the_processor_and_is_answered(running: Running) -> None:
    body = json.dumps({"kind": "invoice.pay", "idempotency_key": new_key(), "user_id": new_user()}).encode()
    async with await PaymentsClient.connect(running.amqp, reply_timeout=15) as client:
        reply = await client.send("invoice.pay", body)
    assert reply.ok is False and reply.error is not None
    assert (
        reply.error.code == "invalid_request" and "unknown request kind 'invoice.pay'" in reply.error.message
    )


async def test_malformed_json_is_answered_not_dead_lettered(running: Running) -> None:
    async with await PaymentsClient.connect(running.amqp, reply_timeout=15) as client:
        reply = await client.send("refund.create", b"\xff\xfe not json")
    assert reply.error is not None and reply.error.code == "invalid_request"
    assert "malformed JSON" in reply.error.message
    assert await queue_depth(running.amqp, DEAD_LETTER_QUEUE) == 0


async def test_a_request_without_reply_to_is_processed_and_stored(running: Running, conn: Conn) -> None:
    key = new_key()
    body = json.dumps(
        {"kind": "portal_session.create", "idempotency_key": key, "user_id": new_user()}
    ).encode()
    connection = await aio_pika.connect(running.amqp)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(REQUESTS_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(body, content_type="application/json"), routing_key="portal_session.create"
        )

    async def stored() -> Any:
        cur = await conn.execute(
            "SELECT status, response FROM payment_requests WHERE idempotency_key = %s AND status <> 'pending'",  # noqa: E501
            (key,),
        )
        return await cur.fetchone()

    status, response = await wait_for(stored)
    assert status == "succeeded" and response["result"]["url"].startswith("https://billing.stripe.com/")
    assert await queue_depth(running.amqp, REQUESTS_QUEUE) == 0


async def test_stripe_down_through_every_retry_tier_is_answered_stripe_unavailable(
    running: Running, fake_stripe: FakeStripe, conn: Conn
) -> None:
    user, key = new_user(), new_key()
    async with await PaymentsClient.connect(running.amqp, reply_timeout=30) as client:
        await client.create_portal_session(idempotency_key=new_key(), user_id=user)  # the customer exists
        # Three deliveries: the first and two retry tiers (the SDK's own retries are proven elsewhere).
        fake_stripe.fail_next("/v1/billing_portal/sessions", 503, 503, 503, sdk_retries=False)
        with pytest.raises(StripeUnavailableError) as caught:
            await client.create_portal_session(idempotency_key=key, user_id=user)
        assert caught.value.retryable is True
        assert (
            len([c for c in fake_stripe.calls_to("/v1/billing_portal/sessions") if c.key and key in c.key])
            == 3
        )
        assert await queue_depth(running.amqp, DEAD_LETTER_QUEUE) == 0  # answered, not silently dead-lettered
        # The key stayed open: the same request succeeds once Stripe is back.
        again = await client.create_portal_session(idempotency_key=key, user_id=user)
    assert again.url.startswith("https://billing.stripe.com/")


async def test_no_reply_in_time_is_a_request_timeout(running: Running, fake_stripe: FakeStripe) -> None:
    held = fake_stripe.hold_next("/v1/billing_portal/sessions")
    key, user = new_key(), new_user()
    async with await PaymentsClient.connect(running.amqp, reply_timeout=0.5) as client:
        with pytest.raises(RequestTimeout) as caught:
            await client.create_portal_session(idempotency_key=key, user_id=user)
        assert caught.value.retryable is True
        held.set()
        # As the error says: the same key later gets the answer of the request that timed out.
        session = await client.create_portal_session(idempotency_key=key, user_id=user, reply_timeout=10)
    assert fake_stripe.created_per_key[f"paybus:{key}:portal"] == 1
    assert session.url.startswith("https://billing.stripe.com/")


async def test_a_bug_in_a_handler_is_answered_internal_error_after_the_retry_tiers(
    database: str, make_vhost: Any, fake_stripe: FakeStripe
) -> None:
    amqp = make_vhost()
    settings = request_settings(database, amqp, fake_stripe.url)
    attempts: list[str] = []

    async def broken(conn: Any, request: Any, deps: Deps, customer_id: str | None) -> Done:
        attempts.append(request.idempotency_key)
        raise RuntimeError("a bug")

    table = {**request_handlers(), "refund.create": KindHandler(validate=no_checks, handle=broken)}
    connection = await aio_pika.connect_robust(amqp)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
    )
    await pool.open()
    stripe = StripeApi.from_settings(settings)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, topology(settings.retry_delays_ms))
        forwarder = Forwarder(channel, REQUESTS_QUEUE, settings.retry_delays_ms)
        await forwarder.open()
        deps = Deps(stripe=stripe, catalog=load_catalog(settings.catalog_path), settings=settings)
        work = RequestProcessor(pool, channel, deps, settings.retry_delays_ms, table)

        async def db_check() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")

        consumer = Consumer(channel, REQUESTS_QUEUE, work, forwarder, db_check, 4)
        task = asyncio.create_task(consumer.run())
        async with await PaymentsClient.connect(amqp, reply_timeout=20) as client:
            reply = await client.request(
                RefundCreate(idempotency_key=new_key(), user_id=uuid.uuid4(), payment_intent_id="pi_123")
            )
            # The consumer survived and still answers.
            after = await client.send("no.such.kind", b"{}")
        await consumer.stop()
        task.cancel()
    finally:
        await stripe.close()
        await pool.close()
        await connection.close()
    assert reply.error is not None
    assert (reply.error.code, reply.error.retryable) == ("internal_error", True)
    assert "a bug" not in reply.error.message  # internals stay inside
    assert len(attempts) == 1 + len(settings.retry_delays_ms)
    assert await queue_depth(amqp, DEAD_LETTER_QUEUE) == 0
    assert after.error is not None and after.error.code == "invalid_request"
