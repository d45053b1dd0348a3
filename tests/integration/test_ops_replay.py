"""`paybus replay`: a replayed duplicate changes nothing; `--force` re-runs the handler exactly once."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg

from shared import samples
from tests.chaos.toolkit import declare, paybus, publish_events
from tests.conftest import env_for
from tests.support import Service, wait_for


async def _row(conn: psycopg.AsyncConnection[Any], event_id: str) -> tuple[Any, ...] | None:
    cur = await conn.execute(
        "SELECT outcome, processed_at, reapply_count, reapply_requested_at FROM stripe_events WHERE id = %s",
        (event_id,),
    )
    return await cur.fetchone()


async def _settled(amqp: str, conn: psycopg.AsyncConnection[Any]) -> None:
    """Wait until everything published so far is handled: with prefetch 1 the processor takes one
    message at a time, so once a sentinel published last is in the ledger, all before it were acked."""
    sentinel = samples.sample_event("payment_intent.created")
    await publish_events(amqp, [samples.encode(sentinel)])

    async def seen() -> bool:
        return await _row(conn, sentinel["id"]) is not None

    await wait_for(seen)


async def test_replay_is_absorbed_and_force_reapplies_once(
    database: str, make_vhost: Any, conn: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    amqp = make_vhost()
    await declare(amqp)
    env = env_for(database, amqp, PROCESSOR_PREFETCH="1")
    processor = Service("processor", env, tmp_path / "processor.log").start()
    try:
        processor.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz")
        user = str(uuid.uuid4())
        event = samples.sample_event("payment_intent.succeeded", user_id=user)
        intent = event["data"]["object"]["id"]
        await publish_events(amqp, [samples.encode(event)])

        async def applied() -> bool:
            row = await _row(conn, event["id"])
            return bool(row and row[0] == "applied")

        await wait_for(applied)
        before = await _row(conn, event["id"])

        code, out, err = await paybus("replay", "--id", event["id"], env=env)
        assert code == 0, err
        assert "1 of 1 stored events republished" in out and "duplicate: no change" in out
        await _settled(amqp, conn)
        assert await _row(conn, event["id"]) == before  # absorbed by the ledger

        # A bug had lost the effect: the payment row is gone. A plain replay cannot bring it back...
        await conn.execute("DELETE FROM payments WHERE stripe_payment_intent_id = %s", (intent,))
        await paybus("replay", "--id", event["id"], env=env)
        await _settled(amqp, conn)
        cur = await conn.execute(
            "SELECT count(*) FROM payments WHERE stripe_payment_intent_id = %s", (intent,)
        )
        assert (await cur.fetchone() or [None])[0] == 0

        # ...after the fix, --force re-runs the handler once.
        code, out, err = await paybus("replay", "--id", event["id"], "--force", "--json", env=env)
        assert code == 0, err
        assert json.loads(out)["published"] == [event["id"]]

        async def restored() -> bool:
            cur = await conn.execute(
                "SELECT status, user_id::text FROM payments WHERE stripe_payment_intent_id = %s", (intent,)
            )
            return await cur.fetchall() == [("succeeded", user)]

        await wait_for(restored)
        await _settled(amqp, conn)
        outcome, _, count, requested = await _row(conn, event["id"]) or (None,) * 4
        assert (outcome, count, requested) == ("applied", 1, None)  # the mark was consumed, outcome kept

        await paybus("replay", "--id", event["id"], env=env)  # a later duplicate stays a duplicate
        await _settled(amqp, conn)
        assert (await _row(conn, event["id"]) or (None,) * 4)[2] == 1
    finally:
        processor.stop()


async def test_replay_selects_by_type_and_time_and_says_what_it_cannot_find(
    database: str, make_vhost: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    amqp = make_vhost()
    await declare(amqp)
    env = env_for(database, amqp)
    code, _, err = await paybus("replay", env=env)
    assert code == 2 and "--id" in err
    code, out, _ = await paybus("replay", "--id", "evt_nowhere_to_be_found", env=env)
    assert code == 1 and "not in the ledger: evt_nowhere_to_be_found" in out
    event = samples.sample_event("payment_intent.canceled", created=1_700_000_000)
    await conn.execute(
        "INSERT INTO stripe_events (id, type, created, livemode, payload, outcome)"
        " VALUES (%s, %s, to_timestamp(%s), false, %s::jsonb, 'applied')",
        (event["id"], event["type"], event["created"], json.dumps(event)),
    )
    code, out, _ = await paybus(
        "replay",
        "--type",
        "payment_intent.cancel*",
        "--since",
        "2023-11-14T22:00:00Z",
        "--dry-run",
        "--json",
        env=env,
    )
    assert code == 0
    selected = [s["id"] for s in json.loads(out)["selected"]]
    assert event["id"] in selected
    assert json.loads(out)["published"] == []
