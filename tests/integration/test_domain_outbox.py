"""The outbox: one domain event per real change, relayed with confirms, also after a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from processor.outbox import OutboxRelay, relay_publisher
from shared import db, domain_events, samples
from shared.amqp import DOMAIN_EXCHANGE, EVENTS_EXCHANGE, declare_topology
from shared.publisher import Publisher
from tests.conftest import env_for
from tests.integration.domain_helpers import Conn, deliver, outbox_types, rows, user
from tests.support import Service, database_url, free_port, unique, wait_for


@pytest.fixture
async def listener(vhost: str) -> AsyncIterator[tuple[str, aio_pika.abc.AbstractQueue]]:
    """The session's vhost with paybus's topology and a fresh queue bound to every domain event.

    Other tests' processors may publish there too; the tests look only for their own outbox ids.
    """
    url = vhost
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel)
        queue = await channel.declare_queue(unique("domain-listener"), exclusive=True)
        await queue.bind(DOMAIN_EXCHANGE, routing_key="#")
        yield url, queue


async def _connected_relay_publisher(url: str) -> Publisher:
    publisher = relay_publisher(url)
    await publisher.start()
    assert await publisher.wait_connected(15)
    return publisher


async def drain(queue: aio_pika.abc.AbstractQueue, want: set[str], within: float = 20) -> dict[str, Any]:
    """Consume until every outbox id in ``want`` arrived; return {message_id: (routing key, message)}."""
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + within
    while not want <= seen.keys():
        assert time.monotonic() < deadline, f"missing domain events: {sorted(want - seen.keys())}"
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        if message.message_id in want:
            assert message.message_id not in seen, "a domain event was published twice"
            seen[message.message_id] = (message.routing_key, message)
    return seen


async def test_only_real_changes_are_announced_never_duplicates_or_stale_events(conn: Conn) -> None:
    u, sub, t = user(), samples.new_id("sub"), int(time.time())

    def event(event_type: str, status: str, created: int, **extra: Any) -> dict[str, Any]:
        return samples.event(
            event_type,
            samples.subscription(subscription_id=sub, user_id=u, status=status, period_start=t, **extra),
            created=created,
        )

    trialing = event("customer.subscription.created", "trialing", t, trial_end=t + 86400)
    active = event("customer.subscription.updated", "active", t + 1)
    for envelope in (trialing, active, trialing, active):  # Stripe retries: the same event ids again
        await deliver(conn, envelope)
    await deliver(conn, event("customer.subscription.updated", "trialing", t))  # stale: older than `active`
    await deliver(conn, event("customer.subscription.updated", "active", t + 2))  # newer, nothing new to say
    await deliver(conn, event("customer.subscription.deleted", "canceled", t + 3, canceled_at=t + 3))
    assert await outbox_types(conn, u) == [
        "subscription.updated",
        "entitlement.granted",
        "entitlement.granted",  # trialing: access starts
        "subscription.updated",  # trialing -> active: access unchanged
        "subscription.updated",
        "entitlement.revoked",
        "entitlement.revoked",  # canceled
    ]
    payloads = await rows(
        conn, "SELECT id::text, event_type, payload FROM outbox WHERE user_id = %s ORDER BY seq", u
    )
    first = domain_events.decode(samples.encode(payloads[0]["payload"]))
    assert isinstance(first, domain_events.SubscriptionUpdated)
    assert (first.id, first.status, first.previous_status, first.user_id) == (
        payloads[0]["id"],
        "trialing",
        None,
        u,
    )


async def test_the_relay_publishes_each_row_once_with_its_id_as_message_id(
    conn: Conn, database: str, listener: tuple[str, aio_pika.abc.AbstractQueue]
) -> None:
    url, queue = listener
    u = user()
    await deliver(
        conn,
        samples.event(
            "payment_intent.succeeded",
            samples.payment_intent(user_id=u, status="succeeded", product="course_bundle"),
        ),
    )
    ours = await rows(conn, "SELECT id::text, event_type FROM outbox WHERE user_id = %s", u)
    assert {r["event_type"] for r in ours} == {"payment.succeeded", "entitlement.granted"}
    publisher = await _connected_relay_publisher(url)
    async with AsyncConnectionPool(
        database, min_size=1, max_size=2, open=False, kwargs={"autocommit": True}
    ) as pool:
        relay = OutboxRelay(pool, publisher, database, poll_interval=0.2)
        task = asyncio.create_task(relay.run())
        try:
            seen = await drain(queue, {r["id"] for r in ours})
        finally:
            relay.stop()
            await asyncio.wait_for(task, timeout=10)
            await publisher.close()
    for row in ours:
        routing_key, message = seen[row["id"]]
        assert routing_key == row["event_type"] == message.type
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.timestamp is not None and abs(message.timestamp.timestamp() - time.time()) < 60
        decoded = domain_events.decode(message.body)
        assert (decoded.id, decoded.user_id) == (row["id"], u)
    published = await rows(conn, "SELECT published_at FROM outbox WHERE user_id = %s", u)
    assert all(r["published_at"] is not None for r in published)


@pytest.mark.e2e
async def test_rows_left_unrelayed_by_a_killed_processor_are_published_after_restart(
    listener: tuple[str, aio_pika.abc.AbstractQueue], tmp_path: Path
) -> None:
    url, queue = listener
    database = database_url(unique("paybus_outbox"))  # its own: every outbox row here is this test's
    db.migrate(database)
    env = env_for(database, url)
    processor = Service("processor", env, tmp_path / "processor.log").start()
    try:
        processor.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz")
        # 1. A live processor applies an event from the queue and relays what it wrote.
        u = user()
        envelope = samples.event(
            "payment_intent.succeeded",
            samples.payment_intent(user_id=u, status="succeeded", product="lifetime_reports"),
        )
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(EVENTS_EXCHANGE)
            await exchange.publish(
                aio_pika.Message(
                    samples.encode(envelope),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=envelope["type"],
            )
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:

            async def live_rows() -> list[dict[str, Any]]:
                return await rows(conn, "SELECT id::text FROM outbox WHERE user_id = %s", u)

            first = await wait_for(live_rows)
            await drain(queue, {r["id"] for r in first})

            async def all_published() -> bool:
                left = await rows(conn, "SELECT 1 FROM outbox WHERE published_at IS NULL")
                return not left

            await wait_for(all_published)  # marked after the confirms; only then is the count below exact
            # 2. Killed: rows written meanwhile (here by a replay in-process) wait in the table.
            processor.kill()
            v = user()
            await deliver(
                conn,
                samples.event(
                    "payment_intent.succeeded",
                    samples.payment_intent(user_id=v, status="succeeded", product="course_bundle"),
                ),
            )
            waiting = await rows(conn, "SELECT id::text FROM outbox WHERE published_at IS NULL")
            assert len(waiting) == 2
            # 3. A new processor publishes them, each exactly once.
            env = {**env, "METRICS_PORT": str(free_port())}
            processor = Service("processor", env, tmp_path / "processor2.log").start()
            processor.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz")
            seen = await drain(queue, {r["id"] for r in waiting})
            assert {key for key, _ in seen.values()} == {"payment.succeeded", "entitlement.granted"}
            await wait_for(all_published)
    finally:
        processor.stop()
        db.drop_database(database)


async def test_events_no_queue_is_bound_to_are_confirmed_and_marked_published(
    conn: Conn, database: str, make_vhost: Callable[[], str]
) -> None:
    url = make_vhost()  # paybus's topology and no subscriber at all
    u = user()
    await deliver(conn, samples.event("payment_intent.payment_failed", samples.payment_intent(user_id=u)))
    connection = await aio_pika.connect(url)
    async with connection:
        await declare_topology(await connection.channel())
    publisher = await _connected_relay_publisher(url)
    async with AsyncConnectionPool(
        database, min_size=1, max_size=1, open=False, kwargs={"autocommit": True}
    ) as pool:
        relay = OutboxRelay(pool, publisher, database)
        while await relay.relay_once():  # the whole backlog of this session's database
            pass
    await publisher.close()
    assert await rows(
        conn, "SELECT event_type, published_at IS NOT NULL AS published FROM outbox WHERE user_id = %s", u
    ) == [{"event_type": "payment.failed", "published": True}]
