"""The processor's unit of work against real Postgres: ledger + effect together, duplicates and unknowns."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from processor.catalog import load_catalog
from processor.context import Context
from processor.errors import Reject
from processor.events import handlers
from processor.ledger import finish_many, parse_event, record_many
from processor.pipeline import EventPipeline
from shared import samples
from tests.support import REPO


@pytest.fixture
async def pipeline(database: str) -> AsyncIterator[EventPipeline]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database, min_size=1, max_size=2, open=False)
    await pool.open()
    yield EventPipeline(pool, handlers(), Context(catalog=load_catalog(REPO / "catalog.toml")))
    await pool.close()


def _intent_event(event_type: str, intent_id: str, created: int, user: str | None = None) -> bytes:
    envelope = samples.sample_event(event_type, user_id=user or str(uuid.uuid4()), created=created)
    envelope["data"]["object"]["id"] = intent_id
    return samples.encode(envelope)


async def _payment(conn: psycopg.AsyncConnection[Any], intent_id: str) -> tuple[Any, ...] | None:
    cur = await conn.execute(
        "SELECT status, amount, user_id::text FROM payments WHERE stripe_payment_intent_id = %s", (intent_id,)
    )
    return await cur.fetchone()


async def test_duplicate_event_changes_nothing(
    pipeline: EventPipeline, conn: psycopg.AsyncConnection[Any]
) -> None:
    intent = samples.new_id("pi")
    body = _intent_event("payment_intent.succeeded", intent, 1_700_000_000)
    assert await pipeline.process(body) == "applied"
    before = await (
        await conn.execute("SELECT * FROM payments WHERE stripe_payment_intent_id = %s", (intent,))
    ).fetchone()
    assert await pipeline.process(body) == "duplicate"
    after = await (
        await conn.execute("SELECT * FROM payments WHERE stripe_payment_intent_id = %s", (intent,))
    ).fetchone()
    assert before == after


async def test_unknown_event_type_is_recorded_as_ignored(
    pipeline: EventPipeline, conn: psycopg.AsyncConnection[Any]
) -> None:
    envelope = samples.event("plan.created", samples.fixture("plan"))
    assert await pipeline.process(samples.encode(envelope)) == "ignored"
    row = await (
        await conn.execute(
            "SELECT type, outcome, processed_at IS NOT NULL FROM stripe_events WHERE id = %s",
            (envelope["id"],),
        )
    ).fetchone()
    assert row == ("plan.created", "ignored", True)


async def test_older_event_after_a_newer_one_is_stale_and_changes_nothing(
    pipeline: EventPipeline, conn: psycopg.AsyncConnection[Any]
) -> None:
    intent, user = samples.new_id("pi"), str(uuid.uuid4())
    assert (
        await pipeline.process(_intent_event("payment_intent.succeeded", intent, 1_700_000_010, user))
        == "applied"
    )
    assert (
        await pipeline.process(_intent_event("payment_intent.processing", intent, 1_700_000_005, user))
        == "stale"
    )
    assert (
        await pipeline.process(_intent_event("payment_intent.created", intent, 1_700_000_010, user))
        == "stale"
    )
    assert await _payment(conn, intent) == ("succeeded", 49900, user)


async def test_failed_attempt_is_not_terminal(
    pipeline: EventPipeline, conn: psycopg.AsyncConnection[Any]
) -> None:
    intent = samples.new_id("pi")
    await pipeline.process(_intent_event("payment_intent.payment_failed", intent, 1_700_000_000))
    assert (await _payment(conn, intent) or ("",))[0] == "failed"
    # same second: succeeded outranks failed; a retried attempt that succeeds wins
    assert (
        await pipeline.process(_intent_event("payment_intent.succeeded", intent, 1_700_000_000)) == "applied"
    )
    assert (await _payment(conn, intent) or ("",))[0] == "succeeded"


async def test_undecodable_body_is_rejected_as_poison_and_writes_nothing(
    pipeline: EventPipeline, conn: psycopg.AsyncConnection[Any]
) -> None:
    with pytest.raises(Reject) as caught:
        await pipeline.process(b'{"id": "evt_x", "type": 5}')
    assert caught.value.reason == "poison"


async def test_invalid_payload_rolls_back_the_effect_and_leaves_a_failed_ledger_row(
    pipeline: EventPipeline, conn: psycopg.AsyncConnection[Any]
) -> None:
    envelope = samples.sample_event("payment_intent.succeeded")
    envelope["data"]["object"]["amount"] = "a lot"
    intent = envelope["data"]["object"]["id"]
    with pytest.raises(Reject) as caught:
        await pipeline.process(samples.encode(envelope))
    assert caught.value.reason == "invalid-payload"
    assert await _payment(conn, intent) is None
    row = await (
        await conn.execute("SELECT outcome FROM stripe_events WHERE id = %s", (envelope["id"],))
    ).fetchone()
    assert row == ("failed",)
    # after a fix (here: a corrected redelivery of the same event id) it applies once
    envelope["data"]["object"]["amount"] = 1000
    assert await pipeline.process(samples.encode(envelope)) == "applied"
    assert (await _payment(conn, intent) or ())[:2] == ("succeeded", 1000)


async def test_the_ledger_row_names_its_user_on_arrival_and_the_finishing_update_is_hot(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    """An event that names its user is recorded with it, so the outcome's UPDATE leaves every indexed
    column as it was and, with the room `0007.ledger-hot-finish` leaves on each page, is a HOT update."""
    bodies = [
        _intent_event("payment_intent.succeeded", samples.new_id("pi"), 1_700_000_000) for _ in range(20)
    ]
    events = [parse_event(body) for body in bodies]
    async with conn.transaction(force_rollback=True):
        assert (
            await record_many(conn, [(body, event, None) for body, event in zip(bodies, events, strict=True)])
            == [True] * 20
        )
        rows = await (
            await conn.execute(
                "SELECT id, user_id::text FROM stripe_events WHERE id = ANY(%s)", ([e.id for e in events],)
            )
        ).fetchall()
        assert dict(rows) == {e.id: e.data.object["metadata"]["user_id"] for e in events}
        await finish_many(conn, [(e.id, "applied", e.data.object["metadata"]["user_id"]) for e in events])
        stats = await (
            await conn.execute(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
                " WHERE relname = 'stripe_events'"
            )
        ).fetchone()
        assert stats == (20, 20), stats
