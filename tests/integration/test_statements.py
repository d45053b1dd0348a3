"""`statements.send`: statements whose result nobody reads share one cursor, and still fail loudly."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from processor.ledger import transaction
from processor.statements import send


async def test_sent_statements_never_lend_their_results_to_a_reader(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    """Twenty tasks on one pipelined connection, each sending a statement before every read: each read
    gets its own statement's row (a shared cursor for reads would hand out the sent statement's)."""
    await conn.execute("CREATE TEMP TABLE sent (task int, n int)")

    async def task(t: int) -> list[int]:
        got = []
        for n in range(10):
            await send(conn, "INSERT INTO sent VALUES (%s, %s)", (t, n))
            row = await (await conn.execute("SELECT %s::int * 1000 + %s::int", (t, n))).fetchone()
            assert row is not None
            got.append(row[0])
        return got

    async with transaction(conn):
        results = await asyncio.gather(*(task(t) for t in range(20)))
    assert results == [[t * 1000 + n for n in range(10)] for t in range(20)]
    count = await (await conn.execute("SELECT count(*) FROM sent")).fetchone()
    assert count == (200,)


async def test_a_failing_sent_statement_fails_its_transaction(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("CREATE TEMP TABLE once (id int PRIMARY KEY)")
    with pytest.raises(psycopg.errors.UniqueViolation):
        async with transaction(conn):
            await send(conn, "INSERT INTO once VALUES (1)")
            await send(conn, "INSERT INTO once VALUES (1)")
    count = await (await conn.execute("SELECT count(*) FROM once")).fetchone()
    assert count == (0,)  # rolled back as a whole
    await send(conn, "INSERT INTO once VALUES (2)")  # the shared cursor still works after the failure
    assert await (await conn.execute("SELECT id FROM once")).fetchall() == [(2,)]
