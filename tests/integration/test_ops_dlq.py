"""`paybus dlq`: looking changes nothing, filters select, purge asks first, requeue survives SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
from datetime import UTC, datetime
from typing import Any

import aio_pika
from pamqp.commands import Basic

from shared import samples
from shared.amqp import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, EVENTS_QUEUE
from tests.chaos.toolkit import PAYBUS, declare, drain, paybus
from tests.conftest import env_for
from tests.support import queue_depth, wait_for


async def _dead_letters(amqp: str, specs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Dead letters shaped like the processor's: (event type, reason) each; returns their envelopes."""
    envelopes = []
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        for event_type, reason in specs:
            envelope = samples.sample_event(event_type)
            envelopes.append(envelope)
            headers = {
                "stripe-event-id": envelope["id"],
                "x-paybus-reason": reason,
                "x-paybus-attempts": 3,
                "x-paybus-error": "RuntimeError: boom",
                "x-paybus-dead-lettered-at": "2026-11-26T10:00:00+00:00",
                "x-paybus-first-failed-at": "2026-11-26T09:59:00+00:00",
                "x-paybus-original-exchange": "stripe.events",
                "x-paybus-original-routing-key": event_type,
                "x-paybus-original-queue": EVENTS_QUEUE,
            }
            message = aio_pika.Message(
                samples.encode(envelope),
                headers=headers,
                type=event_type,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            assert isinstance(await exchange.publish(message, routing_key=""), Basic.Ack)
    return envelopes


async def _list(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    code, out, err = await paybus("dlq", "list", "--json", "--limit", "1000", *args, env=env)
    assert code == 0, err
    return list(json.loads(out))


async def test_list_and_show_leave_every_dead_letter_in_place_and_filters_select(
    database: str, make_vhost: Any
) -> None:
    amqp = make_vhost()
    await declare(amqp)
    env = env_for(database, amqp)
    specs = [("payment_intent.succeeded", "retries-exhausted")] * 5 + [
        ("payment_intent.canceled", "poison")
    ] * 3
    envelopes = await _dead_letters(amqp, specs)
    ids = {e["id"] for e in envelopes}

    first = await _list(env)
    second = await _list(env)
    assert {x["event_id"] for x in first} == {x["event_id"] for x in second} == ids
    assert await queue_depth(amqp, DEAD_LETTER_QUEUE) == 8  # nothing taken by looking

    assert len(await _list(env, "--reason", "poison")) == 3
    assert len(await _list(env, "--type", "payment_intent.succ*")) == 5
    assert [x["event_id"] for x in await _list(env, "--id", envelopes[0]["id"])] == [envelopes[0]["id"]]
    assert len(await _list(env, "--limit", "2")) == 2
    assert await _list(env, "--since", "2030-01-01T00:00:00Z") == []
    assert len(await _list(env, "--since", "2026-11-26T09:00:00Z")) == 8

    code, out, _ = await paybus("dlq", "show", "--id", envelopes[0]["id"], env=env)
    assert code == 0
    for expected in (
        "reason:",
        "retries-exhausted",
        "attempts:",
        "RuntimeError: boom",
        envelopes[0]["id"],
        '"data"',
    ):
        assert expected in out
    code, _, err = await paybus("dlq", "list", "--since", "yesterday", env=env)
    assert code == 2 and "duration" in err  # a clear answer, not a traceback
    assert await queue_depth(amqp, DEAD_LETTER_QUEUE) == 8


async def test_purge_needs_yes_and_deletes_only_what_the_filters_select(
    database: str, make_vhost: Any
) -> None:
    amqp = make_vhost()
    await declare(amqp)
    env = env_for(database, amqp)
    await _dead_letters(
        amqp, [("payment_intent.created", "poison")] * 2 + [("payment_intent.canceled", "x")] * 2
    )

    code, _, err = await paybus("dlq", "purge", "--reason", "poison", env=env)
    assert code == 2 and "--yes" in err
    code, out, _ = await paybus("dlq", "purge", "--reason", "poison", "--dry-run", env=env)
    assert code == 0 and "2 would be purged" in out
    assert await queue_depth(amqp, DEAD_LETTER_QUEUE) == 4

    code, out, _ = await paybus("dlq", "purge", "--reason", "poison", "--yes", env=env)
    assert code == 0 and "2 purged" in out
    assert {x["reason"] for x in await _list(env)} == {"x"}


async def test_requeue_republishes_the_original_with_attempts_reset(database: str, make_vhost: Any) -> None:
    amqp = make_vhost()
    await declare(amqp)
    env = env_for(database, amqp)
    [envelope, other] = await _dead_letters(
        amqp, [("payment_intent.succeeded", "retries-exhausted"), ("payment_intent.created", "poison")]
    )
    code, out, _ = await paybus("dlq", "requeue", "--reason", "retries-exhausted", "--dry-run", env=env)
    assert code == 0 and "1 would be requeued" in out
    assert await queue_depth(amqp, EVENTS_QUEUE) == 0

    code, out, _ = await paybus("dlq", "requeue", "--reason", "retries-exhausted", env=env)
    assert code == 0 and "1 requeued" in out
    [message] = await drain(amqp, EVENTS_QUEUE)
    assert message.body == samples.encode(envelope)  # byte for byte
    assert (message.exchange, message.routing_key, message.type) == (
        "stripe.events",
        envelope["type"],
        envelope["type"],
    )
    headers = message.headers or {}
    assert "x-paybus-attempts" not in headers and "x-paybus-reason" not in headers
    assert headers["x-paybus-requeued-at"] and headers["x-paybus-requeue-count"] == 1
    assert headers["stripe-event-id"] == envelope["id"]
    assert [x["event_id"] for x in await _list(env)] == [other["id"]]


async def test_requeue_killed_at_random_points_loses_no_message(database: str, make_vhost: Any) -> None:
    amqp = make_vhost()
    await declare(amqp)
    env = {**os.environ, **env_for(database, amqp)}
    envelopes = await _dead_letters(amqp, [("payment_intent.succeeded", "retries-exhausted")] * 150)
    expected = {e["id"] for e in envelopes}
    rng = random.Random(5)  # noqa: S311
    kills = 0
    for _ in range(12):
        proc = await asyncio.create_subprocess_exec(
            PAYBUS,
            "dlq",
            "requeue",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        # Kill at a random point of the requeue itself (not on a timer, which a busy machine makes
        # meaningless): once a random number of copies has reached the work queue.
        start = await queue_depth(amqp, EVENTS_QUEUE)
        target = start + rng.randint(1, 25)
        while proc.returncode is None and await queue_depth(amqp, EVENTS_QUEUE) < target:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.02)
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            kills += 1

        async def all_somewhere() -> bool:  # still dead, or requeued (perhaps both): never gone
            dead, requeued = await queue_depth(amqp, DEAD_LETTER_QUEUE), await queue_depth(amqp, EVENTS_QUEUE)
            return dead + requeued >= len(expected)

        await wait_for(all_somewhere, timeout=10)  # once the broker has taken back the unacked ones
        if kills >= 5 or await queue_depth(amqp, DEAD_LETTER_QUEUE) == 0:
            break
    assert kills >= 3, "the random kills should interrupt several runs"
    code, _, _ = await paybus("dlq", "requeue", env=env)  # finish what the killed runs left
    assert code == 0
    assert await queue_depth(amqp, DEAD_LETTER_QUEUE) == 0
    requeued = await drain(amqp, EVENTS_QUEUE)
    seen = {json.loads(m.body)["id"] for m in requeued}
    assert seen == expected  # none lost; a kill between confirm and ack may leave a duplicate
    assert len(requeued) >= len(expected)


async def test_broker_dead_letters_are_explained_from_x_death_and_requeued_to_where_they_came_from(
    database: str, make_vhost: Any
) -> None:
    amqp = make_vhost()
    await declare(amqp)
    env = env_for(database, amqp)
    envelope = samples.sample_event("payment_intent.processing")
    death = {
        "count": 1,
        "reason": "delivery_limit",
        "queue": EVENTS_QUEUE,
        "exchange": "stripe.events",
        "routing-keys": [envelope["type"]],
        "time": datetime(2026, 11, 26, 11, 0, tzinfo=UTC),
    }
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        message = aio_pika.Message(
            samples.encode(envelope), headers={"x-death": [death]}, type=envelope["type"]
        )
        await exchange.publish(message, routing_key="")
    [letter] = await _list(env)
    assert (letter["event_id"], letter["reason"]) == (envelope["id"], "delivery_limit")
    assert letter["dead_lettered_at"].startswith("2026-11-26T11:00")
    code, out, _ = await paybus("dlq", "requeue", "--reason", "delivery_limit", env=env)
    assert code == 0 and "1 requeued" in out
    [back] = await drain(amqp, EVENTS_QUEUE)
    assert back.body == samples.encode(envelope) and "x-death" not in (back.headers or {})


async def test_a_broker_without_the_dead_letter_queue_gets_a_clear_answer(
    database: str, make_vhost: Any
) -> None:
    env = env_for(database, make_vhost())  # nothing declared in this vhost
    code, out, err = await paybus("dlq", "list", env=env)
    assert code == 1 and "NOT_FOUND" in err.upper() and "Traceback" not in err
