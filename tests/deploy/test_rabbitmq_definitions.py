"""deploy/rabbitmq/definitions.json: generated from code, loads into a real broker, least privilege holds."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from shared.amqp import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DOMAIN_EXCHANGE,
    EVENTS_EXCHANGE,
    EVENTS_QUEUE,
    REQUESTS_EXCHANGE,
    REQUESTS_QUEUE,
    RETRY_EXCHANGE,
    declare_topology,
    topology,
)
from tests.deploy.conftest import DEFINITIONS, Broker, load_script
from tests.support import REPO

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def channel_as(broker: Broker, role: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(broker.url(role))
    async with connection:
        yield await connection.channel(publisher_confirms=True)


async def publish(broker: Broker, role: str, exchange: str, key: str) -> None:
    async with channel_as(broker, role) as channel:
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(
            aio_pika.Message(b"{}", message_id=uuid.uuid4().hex), routing_key=key, timeout=10
        )


async def ignore(message: AbstractIncomingMessage) -> None:
    """A consumer that leaves the message unacked: closing the channel returns it to the queue."""


async def consume_one(broker: Broker, role: str, queue: str) -> None:
    async with channel_as(broker, role) as channel:
        declared = await channel.get_queue(queue, ensure=False)
        await declared.consume(ignore)


async def refused(action: object) -> str:
    """Run ``action`` (a coroutine) and return the broker's refusal; fail when the broker allows it."""
    with pytest.raises(
        (aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelNotFoundEntity)
    ) as caught:
        await action  # type: ignore[misc]
    assert isinstance(caught.value, aiormq.exceptions.ChannelAccessRefused), caught.value
    return str(caught.value)


def test_committed_definitions_are_what_the_code_generates() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "rabbitmq" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_definitions_topology_is_the_declared_topology() -> None:
    generate = load_script(REPO / "deploy" / "rabbitmq" / "generate.py")
    built = generate.build()
    expected = topology()
    assert [q["name"] for q in built["queues"]] == [q.name for q in expected.queues]
    assert all(user["password_hash"] == "" for user in built["users"]), "no password may be committed"
    assert DEFINITIONS.read_text() == generate.render()


def test_set_passwords_names_every_missing_password_and_prints_no_secret_when_refusing() -> None:
    script = REPO / "deploy" / "rabbitmq" / "set_passwords.py"
    result = subprocess.run(
        [sys.executable, str(script), "--require-all"],
        capture_output=True,
        text=True,
        env={"PAYBUS_INGRESS_PASSWORD": "s3cret-value"},
    )
    assert result.returncode == 2
    assert "PAYBUS_PROCESSOR_PASSWORD" in result.stderr and "PAYBUS_INGRESS_PASSWORD" not in result.stderr
    assert "s3cret-value" not in result.stdout + result.stderr
    # (that the hashes it writes are RabbitMQ's own scheme is proven by the `broker` fixture: every
    # test below logs in with a password that went through set_passwords.py)


async def test_loaded_definitions_are_exactly_the_topology_the_code_declares(broker: Broker) -> None:
    # re-declaring with the code's arguments succeeds only if every loaded exchange and queue has
    # exactly those (RabbitMQ answers PRECONDITION_FAILED to any difference)
    async with channel_as(broker, "paybus-operator") as channel:
        await declare_topology(channel)
        for queue in topology().queues:
            declared = await channel.declare_queue(queue.name, passive=True)
            assert declared.declaration_result.message_count is not None


async def test_services_find_the_loaded_topology_with_passive_checks(broker: Broker) -> None:
    # what PAYBUS_DECLARE_TOPOLOGY=false does at start-up: no configure right needed
    async with channel_as(broker, "paybus-ingress") as channel:
        await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
    async with channel_as(broker, "paybus-processor") as channel:
        queue = await channel.declare_queue(EVENTS_QUEUE, passive=True)
        assert queue.declaration_result.message_count is not None


async def test_a_user_without_a_password_cannot_log_in(broker: Broker) -> None:
    # what the committed definitions give every user until an operator sets its password
    host = broker.url("paybus-ingress").split("@", 1)[1]
    for password in ("", "guess"):
        with pytest.raises(aiormq.exceptions.AMQPConnectionError):
            await aio_pika.connect(f"amqp://{broker.users['nopassword']}:{password}@{host}")


async def test_ingress_publishes_only_to_stripe_events(broker: Broker) -> None:
    await publish(broker, "paybus-ingress", EVENTS_EXCHANGE, "payment_intent.succeeded")
    for exchange in (REQUESTS_EXCHANGE, DOMAIN_EXCHANGE, RETRY_EXCHANGE, DEAD_LETTER_EXCHANGE, ""):
        reason = await refused(publish(broker, "paybus-ingress", exchange, EVENTS_QUEUE))
        assert "ACCESS_REFUSED" in reason


async def test_ingress_cannot_consume_declare_or_delete(broker: Broker) -> None:
    for queue in (EVENTS_QUEUE, REQUESTS_QUEUE, DEAD_LETTER_QUEUE):
        assert "ACCESS_REFUSED" in await refused(consume_one(broker, "paybus-ingress", queue))

    async def declare() -> None:
        async with channel_as(broker, "paybus-ingress") as channel:
            await channel.declare_queue("paybus.sneaky", durable=True)

    async def delete() -> None:
        async with channel_as(broker, "paybus-ingress") as channel:
            await channel.queue_delete(EVENTS_QUEUE)

    await refused(declare())
    await refused(delete())


async def test_processor_consumes_its_queues_and_publishes_only_where_it_must(broker: Broker) -> None:
    await consume_one(broker, "paybus-processor", EVENTS_QUEUE)
    await consume_one(broker, "paybus-processor", REQUESTS_QUEUE)
    for exchange, key in (
        (DEAD_LETTER_EXCHANGE, ""),
        (DOMAIN_EXCHANGE, "payment.succeeded"),
        ("", DEAD_LETTER_QUEUE),
    ):
        await publish(broker, "paybus-processor", exchange, key)
    await refused(publish(broker, "paybus-processor", EVENTS_EXCHANGE, "payment_intent.succeeded"))
    await refused(publish(broker, "paybus-processor", REQUESTS_EXCHANGE, "refund.create"))
    await refused(consume_one(broker, "paybus-processor", DEAD_LETTER_QUEUE))


async def test_backend_client_publishes_requests_and_reads_only_its_own_reply_queue(broker: Broker) -> None:
    async with channel_as(broker, "paybus-client") as channel:
        reply = await channel.declare_queue(exclusive=True)  # server-named amq.gen-...
        assert reply.name.startswith("amq.gen-")
        await reply.consume(ignore)
    await publish(broker, "paybus-client", REQUESTS_EXCHANGE, "payment_intent.create")
    await refused(publish(broker, "paybus-client", EVENTS_EXCHANGE, "payment_intent.succeeded"))
    await refused(consume_one(broker, "paybus-client", REQUESTS_QUEUE))
    await refused(consume_one(broker, "paybus-client", EVENTS_QUEUE))

    async def named_queue() -> None:
        async with channel_as(broker, "paybus-client") as channel:
            await channel.declare_queue("paybus.stripe-events-copy", exclusive=True)

    await refused(named_queue())


async def test_operator_reaches_paybus_names_and_nothing_else(broker: Broker) -> None:
    await consume_one(broker, "paybus-operator", DEAD_LETTER_QUEUE)
    await publish(broker, "paybus-operator", EVENTS_EXCHANGE, "payment_intent.succeeded")

    async def foreign_exchange() -> None:
        async with channel_as(broker, "paybus-operator") as channel:
            await channel.declare_exchange("billing.other", aio_pika.ExchangeType.TOPIC)

    await refused(foreign_exchange())
