"""Failed events: bounded retries through the delay queues, dead letters with reasons, requeue after a fix."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from shared import samples
from shared.amqp import DEAD_LETTER_QUEUE, EVENTS_QUEUE
from tests.chaos.toolkit import declare, paybus, publish_events
from tests.conftest import env_for
from tests.support import Service, queue_depth, unique, wait_for

DELAYS = "100,200,300"


def _intent_event(event_type: str, intent_id: str, **envelope: Any) -> dict[str, Any]:
    status = {"payment_intent.succeeded": "succeeded", "payment_intent.created": "requires_payment_method"}
    obj = samples.payment_intent(intent_id=intent_id, user_id=str(uuid.uuid4()), status=status[event_type])
    return samples.event(event_type, obj, **envelope)


async def _ledger(conn: psycopg.AsyncConnection[Any], event_id: str) -> list[tuple[Any, ...]]:
    cur = await conn.execute("SELECT outcome FROM stripe_events WHERE id = %s", (event_id,))
    return await cur.fetchall()


def _start_processor(database: str, amqp: str, tmp_path: Path) -> tuple[Service, dict[str, str]]:
    env = env_for(database, amqp, PAYBUS_RETRY_DELAYS_MS=DELAYS)
    processor = Service("processor", env, tmp_path / "processor.log").start()
    processor.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz")
    return processor, env


async def test_failing_event_dead_letters_after_exactly_the_configured_attempts_and_requeue_applies_it_once(
    database: str, make_vhost: Any, conn: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    amqp = make_vhost()
    await declare(amqp, (100, 200, 300))
    intent = samples.new_id("pi")
    bug, runs = unique("paybus_bug"), unique("paybus_runs")
    # The "bug": a trigger that fails every write of this one PaymentIntent and counts its runs in a
    # sequence (sequences are not rolled back, so the count survives the failed transactions).
    await conn.execute(f"CREATE SEQUENCE {runs}")
    await conn.execute(
        f"CREATE FUNCTION {bug}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" IF NEW.stripe_payment_intent_id = '{intent}' THEN PERFORM nextval('{runs}');"
        f" RAISE EXCEPTION 'simulated bug'; END IF; RETURN NEW; END $$"
    )
    await conn.execute(
        f"CREATE TRIGGER {bug} BEFORE INSERT OR UPDATE ON payments FOR EACH ROW EXECUTE FUNCTION {bug}()"
    )
    processor, env = _start_processor(database, amqp, tmp_path)
    try:
        event = _intent_event("payment_intent.succeeded", intent)
        started = time.monotonic()
        await publish_events(amqp, [samples.encode(event)])
        await wait_for(lambda: _depth(amqp, DEAD_LETTER_QUEUE), timeout=20)
        elapsed = time.monotonic() - started
        attempts = (await (await conn.execute(f"SELECT last_value FROM {runs}")).fetchone() or [0])[0]
        assert attempts == 4  # the first try and one per configured delay, no more
        assert elapsed >= 0.8 * (0.1 + 0.2 + 0.3)  # it waited in the delay queues (jitter is at most -20%)
        assert await _ledger(conn, event["id"]) == []  # nothing half-applied

        code, out, _ = await paybus("dlq", "list", "--json", env=env)
        assert code == 0
        [letter] = [x for x in json.loads(out) if x["event_id"] == event["id"]]
        assert letter["reason"] == "retries-exhausted"
        assert letter["attempts"] == 4
        assert "simulated bug" in letter["error"]
        assert (letter["original_exchange"], letter["original_routing_key"]) == (
            "stripe.events",
            event["type"],
        )

        await conn.execute(f"DROP TRIGGER {bug} ON payments")  # the fix is deployed
        code, out, _ = await paybus("dlq", "requeue", "--id", event["id"], env=env)
        assert code == 0, out
        assert "1 requeued" in out

        async def applied() -> bool:
            return await _ledger(conn, event["id"]) == [("applied",)]

        await wait_for(applied)
        cur = await conn.execute("SELECT status FROM payments WHERE stripe_payment_intent_id = %s", (intent,))
        assert await cur.fetchall() == [("succeeded",)]
        assert await queue_depth(amqp, DEAD_LETTER_QUEUE) == 0
        assert await queue_depth(amqp, EVENTS_QUEUE) == 0
    finally:
        processor.stop()
        await conn.execute(f"DROP TRIGGER IF EXISTS {bug} ON payments")
        await conn.execute(f"DROP FUNCTION IF EXISTS {bug}()")
        await conn.execute(f"DROP SEQUENCE IF EXISTS {runs}")


async def test_unknown_schema_and_poison_go_straight_to_the_dead_letters(
    database: str, make_vhost: Any, conn: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    amqp = make_vhost()
    await declare(amqp, (100, 200, 300))
    processor, env = _start_processor(database, amqp, tmp_path)
    try:
        future = _intent_event(
            "payment_intent.created", samples.new_id("pi"), api_version="2099-01-01.future"
        )
        poison = b'{"id": "evt_broken", "type": "payment_intent.created", "created": 1, "data": ['
        fine = _intent_event("payment_intent.created", samples.new_id("pi"))
        await publish_events(amqp, [samples.encode(future), poison, samples.encode(fine)])
        await wait_for(lambda: _depth(amqp, DEAD_LETTER_QUEUE, 2))

        async def fine_applied() -> bool:
            return await _ledger(conn, fine["id"]) == [("applied",)]

        await wait_for(fine_applied)
        code, out, _ = await paybus("dlq", "list", "--json", env=env)
        letters = {x["reason"]: x for x in json.loads(out)}
        assert set(letters) == {"unknown-schema", "poison"}
        assert letters["unknown-schema"]["event_id"] == future["id"]
        assert letters["unknown-schema"]["attempts"] == 1  # no retries for what can never succeed
        assert "2099-01-01.future" in letters["unknown-schema"]["error"]
        assert letters["poison"]["attempts"] == 1
        assert await _ledger(conn, future["id"]) == [("failed",)]  # visible in the audit log

        code, out, _ = await paybus("dlq", "show", "--reason", "unknown-schema", env=env)
        assert code == 0
        assert "x-paybus-reason" in out and "2099-01-01.future" in out and '"object": "event"' in out
    finally:
        processor.stop()


async def _depth(amqp: str, queue: str, at_least: int = 1) -> bool:
    return await queue_depth(amqp, queue) >= at_least
