"""Prepared statements are planned with the statistics of the moment, not frozen while tables are small."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from processor.service import plan_each_execution
from processor.store import payment_effects
from shared import db
from tests.support import database_url, unique


@pytest.fixture
def fresh() -> Iterator[str]:
    """A newly migrated database: `payments` empty and never analyzed, as when a processor first starts."""
    url = database_url(unique("paybus_plans"))
    db.migrate(url)
    yield url
    db.drop_database(url)


LOOKUP = (
    "SELECT * FROM payments WHERE stripe_payment_intent_id = %s OR stripe_checkout_session_id = %s"
    " ORDER BY created_at"
)


async def _plan_after_growth(database: str, configure: bool) -> str:
    """Use the payment lookup while `payments` is empty, grow the table, then explain the same prepared
    statement; the rows are rolled back so the test leaves nothing behind."""
    async with await psycopg.AsyncConnection.connect(database, prepare_threshold=0) as conn:
        if configure:
            await plan_each_execution(conn)
        async with conn.transaction(force_rollback=True):
            await conn.execute("DELETE FROM payments WHERE stripe_payment_intent_id LIKE 'pi_plan_%'")
            for i in range(8):  # past Postgres's five custom plans: a generic one may be cached now
                await conn.execute(LOOKUP, (f"pi_plan_x{i}", f"cs_plan_x{i}"))
            await conn.execute(
                "INSERT INTO payments (stripe_payment_intent_id, stripe_checkout_session_id, amount,"
                " currency, status, status_event_created, status_rank)"
                " SELECT 'pi_plan_' || n, 'cs_plan_' || n, 100, 'inr', 'open', 1, 0"
                " FROM generate_series(1, 20000) AS n"
            )
            # no ANALYZE: autovacuum visits once a minute, and a backlog drains within that minute
            row = await (
                await conn.execute(
                    "SELECT name FROM pg_prepared_statements WHERE statement = %s",
                    (LOOKUP.replace("%s", "$1", 1).replace("%s", "$2", 1),),
                )
            ).fetchone()
            assert row is not None, "the lookup was not prepared"
            plan = await (
                await conn.execute(f"EXPLAIN EXECUTE {row[0]}('pi_plan_7', 'cs_plan_7')")  # noqa: S608 - server name
            ).fetchall()
    return "\n".join(str(r[0]) for r in plan)


@pytest.mark.parametrize("configure", [True])
async def test_a_lookup_prepared_on_an_empty_table_uses_the_index_once_it_grew(
    database: str, configure: bool
) -> None:
    plan = await _plan_after_growth(database, configure)
    assert "Seq Scan on payments" not in plan, plan
    assert "payments_stripe_payment_intent_id_key" in plan, plan


async def test_without_it_the_frozen_plan_scans_the_whole_table(fresh: str) -> None:
    """The failure the setting prevents: the plan made while the table was empty is kept."""
    plan = await _plan_after_growth(fresh, configure=False)
    assert "Seq Scan on payments" in plan, plan


# 5,000 PaymentIntents, each with a charge, a refund of 100 and a won dispute.
SETTLE_NEIGHBOURS = (
    "INSERT INTO charges (id, stripe_payment_intent_id, amount, amount_refunded, status)"
    " SELECT 'ch_plan_' || n, 'pi_plan_' || n, 100, 0, 'succeeded'"
    " FROM generate_series(1, 5000) AS n",
    "INSERT INTO refunds (id, stripe_payment_intent_id, stripe_charge_id, amount, status)"
    " SELECT 're_plan_' || n, 'pi_plan_' || n, 'ch_plan_' || n, 100, 'succeeded'"
    " FROM generate_series(1, 5000) AS n",
    "INSERT INTO disputes (id, stripe_payment_intent_id, stripe_charge_id, amount, status)"
    " SELECT 'dp_plan_' || n, 'pi_plan_' || n, 'ch_plan_' || n, 100, 'won'"
    " FROM generate_series(1, 5000) AS n",
)


async def test_settling_a_payment_reads_refunds_and_disputes_by_index_not_whole_tables(database: str) -> None:
    """The refunds and disputes of one PaymentIntent (by its id or its charges) are index lookups.

    Written as `pi = p.pi OR charge IN (SELECT ...)`, every settle read the whole refunds table and
    the whole disputes table twice: 60 ms a payment event once each held 100,000 rows.
    """
    async with await psycopg.AsyncConnection.connect(database) as conn:
        await plan_each_execution(conn)
        async with conn.transaction(force_rollback=True):
            for statement in SETTLE_NEIGHBOURS:
                await conn.execute(statement)
            cur = await conn.execute(
                "INSERT INTO payments (stripe_payment_intent_id, amount, currency, status,"
                " status_event_created, status_rank) VALUES ('pi_plan_7', 100, 'inr', 'succeeded', 1, 5)"
                " RETURNING id"
            )
            row = await cur.fetchone()
            assert row is not None
            await conn.execute("ANALYZE charges, refunds, disputes")
            query = payment_effects._SETTLE.replace("%(id)s", "%s")
            explained = await (await conn.execute(f"EXPLAIN {query}", (row[0], row[0]))).fetchall()
            plan = "\n".join(str(r[0]) for r in explained)
            for table in ("charges", "refunds", "disputes"):
                assert f"Seq Scan on {table}" not in plan, plan
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            settled = await (await cur.execute(query, (row[0], row[0]))).fetchone()
            # pi_plan_7's refund, found by its PaymentIntent and by its charge, counts once
            assert settled is not None, plan
            assert (settled["amount_refunded"], settled["dispute_status"]) == (100, "won"), settled
