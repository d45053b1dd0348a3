"""The processor's pool tests a connection on checkout only when it sat idle (`processor.pooling`)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from processor.pooling import IdleCheck


async def _pool(database: str, check: IdleCheck) -> AsyncConnectionPool[Any]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database, min_size=1, max_size=1, open=False, check=check.check, reset=check.reset
    )
    await pool.open(wait=True)
    return pool


async def _backend(pool: AsyncConnectionPool[Any]) -> int:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
    assert row is not None
    return int(row[0])


async def _terminate(database: str, backend: int) -> None:
    """End a pooled connection's server process, as a Postgres restart would (waits until it is gone)."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as admin:
        await admin.execute("SELECT pg_terminate_backend(%s, 5000)", (backend,))


async def test_a_connection_back_a_moment_ago_is_not_tested(database: str) -> None:
    check = IdleCheck(fresh=60.0)
    pool = await _pool(database, check)
    try:
        await _backend(pool)  # never returned before: tested
        assert check.tested == 1
        for _ in range(5):
            await _backend(pool)
        assert check.tested == 1
    finally:
        await pool.close()


async def test_a_connection_idle_too_long_is_tested_and_replaced_when_dead(database: str) -> None:
    check = IdleCheck(fresh=0.0)
    pool = await _pool(database, check)
    try:
        first = await _backend(pool)
        await _terminate(database, first)
        # The killed connection fails its test on checkout; the pool hands out a new one instead of
        # letting the first statement of a batch fail.
        second = await _backend(pool)
        assert second != first
        assert check.tested >= 3
    finally:
        await pool.close()


async def test_a_fresh_connection_killed_fails_its_first_statement(database: str) -> None:
    """The window the check leaves open: the statement fails, as a restart mid-batch would make it."""
    check = IdleCheck(fresh=60.0)
    pool = await _pool(database, check)
    try:
        first = await _backend(pool)
        await _terminate(database, first)
        with pytest.raises(psycopg.OperationalError):
            await _backend(pool)
        assert await _backend(pool) != first  # the broken one was discarded on return
    finally:
        await pool.close()
