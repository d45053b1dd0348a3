"""End to end with real processes: signed webhook -> ingress -> RabbitMQ -> processor -> Postgres."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from shared import samples
from shared.amqp import DEAD_LETTER_QUEUE, EVENTS_QUEUE
from tests.e2e.conftest import Stack
from tests.support import queue_depth, signed, wait_for


def _post(url: str, envelope: dict[str, Any] | bytes) -> int:
    body, headers = signed(envelope)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def _one(conn: psycopg.AsyncConnection[Any], query: str, *args: object) -> Any:
    row = await (await conn.execute(query, args)).fetchone()
    return row[0] if row else None


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])  # the default, and the one to fall back on
async def test_same_event_posted_five_times_gives_one_ledger_row_and_one_payment(
    stack_factory: Callable[..., Stack],
    make_vhost: Callable[[], str],
    conn: psycopg.AsyncConnection[Any],
    loop: str,
) -> None:
    stack = stack_factory(make_vhost(), WEBHOOK_PATH_TOKEN="e2e-token", PAYBUS_EVENT_LOOP=loop)
    stack.start_ingress()
    stack.start_processor()
    user = "7d3f7c8e-1111-4a5b-9c9d-000000000001"
    envelope = samples.sample_event("payment_intent.succeeded", user_id=user)
    intent_id = envelope["data"]["object"]["id"]
    assert [_post(stack.webhook_url, envelope) for _ in range(5)] == [200] * 5

    async def ledger_done() -> bool:
        return bool(await _one(conn, "SELECT outcome FROM stripe_events WHERE id = %s", envelope["id"]))

    await wait_for(ledger_done)
    await wait_for(lambda: _drained(stack))
    assert await _one(conn, "SELECT count(*) FROM stripe_events WHERE id = %s", envelope["id"]) == 1
    rows = await (
        await conn.execute(
            "SELECT user_id::text, status, amount, currency FROM payments"
            " WHERE stripe_payment_intent_id = %s",
            (intent_id,),
        )
    ).fetchall()
    assert rows == [(user, "succeeded", 49900, "inr")]
    for service in (stack.ingress, stack.processor):  # each says which loop it really runs on
        assert f"event loop {loop}" in service.log(), service.log()[-2000:]


async def _drained(stack: Stack) -> bool:
    return await queue_depth(stack.env["AMQP_URL"], EVENTS_QUEUE) == 0


async def test_processor_killed_before_ack_gets_the_event_again_and_applies_it_once(
    stack_factory: Callable[..., Stack],
    make_vhost: Callable[[], str],
    conn: psycopg.AsyncConnection[Any],
    database: str,
) -> None:
    stack = stack_factory(make_vhost())
    stack.start_ingress()
    stack.start_processor()
    envelope = samples.sample_event("payment_intent.processing")
    intent_id = envelope["data"]["object"]["id"]

    # Hold the ledger's lock so the processor receives the message and blocks inside its transaction.
    async with await psycopg.AsyncConnection.connect(database) as blocker:
        await blocker.execute("LOCK TABLE stripe_events IN EXCLUSIVE MODE")
        assert _post(stack.webhook_url, envelope) == 200

        async def processor_is_waiting() -> bool:
            return bool(
                await _one(
                    conn,
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%%INSERT INTO stripe_events%%' AND datname = current_database()",
                )
            )

        await wait_for(processor_is_waiting)
        assert stack.processor.proc is not None
        os.kill(stack.processor.proc.pid, signal.SIGKILL)
        stack.processor.proc.wait(timeout=10)
        await blocker.rollback()

    assert await _one(conn, "SELECT count(*) FROM stripe_events WHERE id = %s", envelope["id"]) == 0
    stack.start_processor()

    async def applied() -> bool:
        return (
            await _one(conn, "SELECT outcome FROM stripe_events WHERE id = %s", envelope["id"]) == "applied"
        )

    await wait_for(applied)
    await wait_for(lambda: _drained(stack))
    assert (
        await _one(conn, "SELECT count(*) FROM payments WHERE stripe_payment_intent_id = %s", intent_id) == 1
    )
    assert (
        await _one(conn, "SELECT status FROM payments WHERE stripe_payment_intent_id = %s", intent_id)
        == "processing"
    )


async def test_undecodable_message_is_dead_lettered_with_a_reason_not_redelivered_forever(
    stack_factory: Callable[..., Stack], make_vhost: Callable[[], str]
) -> None:
    import aio_pika

    amqp = make_vhost()
    stack = stack_factory(amqp)
    stack.start_processor()
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("stripe.events")
        await exchange.publish(
            aio_pika.Message(b"{not json", type="payment_intent.succeeded"),
            routing_key="payment_intent.succeeded",
        )

        async def dead_lettered() -> int:
            return await queue_depth(amqp, DEAD_LETTER_QUEUE)

        assert await wait_for(dead_lettered) == 1
        queue = await channel.get_queue(DEAD_LETTER_QUEUE)
        message = await queue.get(no_ack=False)
        assert message is not None
        assert message.body == b"{not json"
        assert message.headers["x-paybus-reason"] == "poison"
        assert message.headers["x-paybus-original-exchange"] == "stripe.events"
        assert message.headers["x-paybus-original-routing-key"] == "payment_intent.succeeded"
        assert message.headers["x-paybus-attempts"] == 1
        await message.nack(requeue=True)
    assert await queue_depth(amqp, EVENTS_QUEUE) == 0
    assert "Traceback" not in stack.processor.log()


def test_bad_production_configuration_exits_non_zero_naming_every_variable(tmp_path: Path) -> None:
    paybus = str(Path(sys.executable).parent / "paybus")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "DATABASE_", "AMQP_"))}
    env.update({"PAYBUS_ENV": "production", "INGRESS_PORT": "http", "STRIPE_WEBHOOK_SECRET": "nope"})
    for service in ("ingress", "processor"):
        result = subprocess.run([paybus, service], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2
        for name in (
            "DATABASE_URL",
            "AMQP_URL",
            "STRIPE_WEBHOOK_SECRET",
            "STRIPE_SECRET_KEY",
            "INGRESS_PORT",
        ):
            assert name in result.stderr
        assert "nope" not in result.stderr


async def test_send_event_lands_in_payments(
    stack_factory: Callable[..., Stack], make_vhost: Callable[[], str], conn: psycopg.AsyncConnection[Any]
) -> None:
    stack = stack_factory(make_vhost())
    stack.start_ingress()
    stack.start_processor()
    user = "7d3f7c8e-2222-4a5b-9c9d-000000000002"
    paybus = str(Path(sys.executable).parent / "paybus")
    result = subprocess.run(
        [paybus, "send-event", "payment_intent.succeeded", "--user", user],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert '"status": 200' in result.stdout

    async def landed() -> Any:
        return await _one(conn, "SELECT status FROM payments WHERE user_id = %s", user)

    assert await wait_for(landed) == "succeeded"


async def test_a_conflicting_queue_on_the_broker_is_named_and_stops_the_processor(
    database: str, make_vhost: Callable[[], str], tmp_path: Path
) -> None:
    import aio_pika

    from tests.conftest import env_for
    from tests.support import Service, wait_for_sync

    amqp = make_vhost()
    connection = await aio_pika.connect(amqp)
    async with connection:  # what an older paybus left: the dead-letter queue without its delivery limit
        channel = await connection.channel()
        await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    env = env_for(database, amqp)
    processor = Service("processor", env, tmp_path / "processor.log").start()
    assert processor.proc is not None
    assert processor.proc.wait(timeout=60) == 2
    log = processor.log()
    assert "RabbitMQ topology conflict" in log and "paybus.dead-letter" in log and "x-delivery-limit" in log
    assert "Traceback" not in log
    processor.stop()

    # the ingress keeps running, says the same, and is not ready (Stripe gets 503s and retries)
    ingress = Service("ingress", env, tmp_path / "ingress.log").start()
    try:
        wait_for_sync(lambda: "RabbitMQ topology conflict" in ingress.log(), timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{env['INGRESS_PORT']}/healthz", timeout=5) as response:
            assert response.status == 200
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{env['INGRESS_PORT']}/readyz", timeout=5)
            raise AssertionError("ingress reported ready with a conflicting topology")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
    finally:
        ingress.stop()
