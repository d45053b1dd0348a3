"""No event reads a whole table: with every table grown large, applying each kind of event scans none.

A statement that cannot use an index costs nothing on a test database and a full table read per event
in production (the settle statement once read all refunds and disputes for every payment event). Here
every table the processor touches holds thousands of rows, analyzed, and a set of events covering every
handler (new objects and existing ones) is applied through the same code as the processor, on a
connection configured as the processor's; Postgres's own per-table counter of sequential scans must not
move.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest

from processor import outbox
from processor.service import plan_each_execution
from shared import db, samples
from tests.integration.domain_helpers import HANDLERS, deliver
from tests.support import database_url, unique

ROWS = 5000
BIG_TABLES = (
    "payments",
    "charges",
    "refunds",
    "disputes",
    "entitlements",
    "stripe_customers",
    "subscriptions",
    "invoices",
    "outbox",
    "stripe_events",
)
# Rows of other customers, payments, subscriptions...: `big_N` ids, so the events below can also meet one.
GROW = (
    "INSERT INTO stripe_customers (stripe_customer_id, user_id)"
    " SELECT 'cus_big_' || n, gen_random_uuid() FROM generate_series(1, {n}) AS n",
    "INSERT INTO payments (stripe_payment_intent_id, stripe_checkout_session_id, stripe_customer_id, user_id,"
    " subscription_id, mode, amount, currency, status, status_event_created, status_rank, paid_at)"
    " SELECT 'pi_big_' || n, 'cs_big_' || n, 'cus_big_' || n, gen_random_uuid(), 'sub_big_' || n, 'payment',"
    " 49900, 'inr', 'succeeded', 1, 5, now() FROM generate_series(1, {n}) AS n",
    "INSERT INTO charges (id, stripe_payment_intent_id, amount, status)"
    " SELECT 'ch_big_' || n, 'pi_big_' || n, 49900, 'succeeded' FROM generate_series(1, {n}) AS n",
    "INSERT INTO refunds (id, stripe_payment_intent_id, stripe_charge_id, amount, status)"
    " SELECT 're_big_' || n, 'pi_big_' || n, 'ch_big_' || n, 100, 'succeeded'"
    " FROM generate_series(1, {n}) AS n",
    "INSERT INTO disputes (id, stripe_payment_intent_id, stripe_charge_id, amount, status)"
    " SELECT 'dp_big_' || n, 'pi_big_' || n, 'ch_big_' || n, 100, 'won'"
    " FROM generate_series(1, {n}) AS n",
    "INSERT INTO entitlements (user_id, feature, source_type, source_id, active)"
    " SELECT gen_random_uuid(), 'reports', 'payment', 'src_big_' || n, true"
    " FROM generate_series(1, {n}) AS n",
    "INSERT INTO subscriptions (id, stripe_customer_id, user_id, status)"
    " SELECT 'sub_big_' || n, 'cus_big_' || n, gen_random_uuid(), 'active' FROM generate_series(1, {n}) AS n",
    "INSERT INTO invoices (id, subscription_id, stripe_customer_id)"
    " SELECT 'in_big_' || n, 'sub_big_' || n, 'cus_big_' || n FROM generate_series(1, {n}) AS n",
    "INSERT INTO outbox (event_type, payload, published_at)"
    " SELECT 'payment.succeeded', '{{}}', now() FROM generate_series(1, {n}) AS n",
    "INSERT INTO stripe_events (id, type, created, livemode, payload, object_id, outcome, processed_at)"
    " SELECT 'evt_big_' || n, 'payment_intent.succeeded', now(), false, '{{}}', 'pi_big_' || n, 'applied',"
    " now()"
    " FROM generate_series(1, {n}) AS n",
)


@pytest.fixture
def grown() -> Iterator[str]:
    url = database_url(unique("paybus_scale"))
    db.migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in GROW:
            conn.execute(statement.format(n=ROWS))  # type: ignore[arg-type]  # fixed text, no input
        conn.execute("ANALYZE")
    yield url
    db.drop_database(url)


@pytest.fixture
async def processor_conn(grown: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(grown, autocommit=True) as conn:
        await plan_each_execution(conn)
        yield conn


async def seq_scans(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    await conn.execute("SELECT pg_stat_force_next_flush()")  # this backend's counts, now
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = await (
        await conn.execute(
            "SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname = ANY(%s)", (list(BIG_TABLES),)
        )
    ).fetchall()
    return {name: count for name, count in rows}


def events() -> list[dict[str, Any]]:
    """Every handled type on a new object, a payment's whole life, and events about existing rows."""
    t = int(time.time())
    user = "3f9d1b7e-5c1a-4e8b-9a53-0d7c2a8b6e41"
    pi, ch, cs = samples.new_id("pi"), samples.new_id("ch"), samples.new_id("cs_test")
    out = [samples.sample_event(event_type, created=t) for event_type in sorted(HANDLERS)]
    out += [
        samples.event(
            "payment_intent.created",
            samples.payment_intent(intent_id=pi, user_id=user, product="lifetime_reports"),
            created=t,
        ),
        samples.event(
            "checkout.session.completed",
            samples.checkout_session(session_id=cs, intent_id=pi, user_id=user, product="lifetime_reports"),
            created=t + 1,
        ),
        samples.event(
            "payment_intent.succeeded",
            samples.payment_intent(
                intent_id=pi, user_id=user, status="succeeded", product="lifetime_reports"
            ),
            created=t + 2,
        ),
        samples.event(
            "charge.refunded", samples.charge(charge_id=ch, intent_id=pi, amount_refunded=100), created=t + 3
        ),
        samples.event(
            "refund.created", samples.refund(charge_id=ch, intent_id=pi, amount=100), created=t + 3
        ),
        samples.event("charge.dispute.created", samples.dispute(charge_id=ch, intent_id=pi), created=t + 4),
        # existing rows of the grown tables
        samples.event(
            "payment_intent.succeeded",
            samples.payment_intent(intent_id="pi_big_7", status="succeeded"),
            created=t,
        ),
        samples.event(
            "charge.refunded",
            samples.charge(charge_id="ch_big_8", intent_id="pi_big_8", amount_refunded=49900),
            created=t,
        ),
        samples.event(
            "charge.dispute.closed",
            samples.dispute(dispute_id="dp_big_9", charge_id="ch_big_9", intent_id="pi_big_9", status="lost"),
            created=t,
        ),
        samples.event(
            "checkout.session.completed",
            samples.checkout_session(session_id="cs_big_10", intent_id="pi_big_10"),
            created=t,
        ),
        samples.event(
            "customer.updated", samples.customer(customer_id="cus_big_11", user_id=user), created=t
        ),
        samples.event(
            "customer.subscription.updated",
            samples.subscription(subscription_id="sub_big_12", customer="cus_big_12", status="past_due"),
            created=t,
        ),
        samples.event(
            "invoice.paid",
            samples.invoice(invoice_id="in_big_13", subscription_id="sub_big_13", customer="cus_big_13"),
            created=t,
        ),
    ]
    return out


async def test_no_event_reads_a_whole_table_once_the_tables_are_large(
    processor_conn: psycopg.AsyncConnection[Any],
) -> None:
    before = await seq_scans(processor_conn)
    assert set(before) == set(BIG_TABLES)
    outcomes = [await deliver(processor_conn, envelope) for envelope in events()]
    assert outcomes.count("applied") >= len(HANDLERS), outcomes
    after = await seq_scans(processor_conn)
    scanned = {name: after[name] - before[name] for name in BIG_TABLES if after[name] != before[name]}
    assert scanned == {}, f"sequential scans while applying events: {scanned}"


async def test_the_outbox_relay_reads_only_unpublished_rows_by_index(
    processor_conn: psycopg.AsyncConnection[Any],
) -> None:
    for envelope in events()[-7:]:  # a few unpublished rows among the grown table's published ones
        await deliver(processor_conn, envelope)
    before = await seq_scans(processor_conn)
    async with processor_conn.transaction(force_rollback=True):
        claimed = await (await processor_conn.execute(outbox._CLAIM, (100,))).fetchall()
        assert claimed, "the events left nothing to publish"
        await processor_conn.execute(outbox._MARK, ([row[0] for row in claimed],))
        await processor_conn.execute(outbox._BACKLOG)
    after = await seq_scans(processor_conn)
    assert after["outbox"] == before["outbox"]


async def test_the_check_sees_a_whole_table_read(processor_conn: psycopg.AsyncConnection[Any]) -> None:
    """The counter the test above relies on does move when a statement reads a whole table."""
    before = await seq_scans(processor_conn)
    await processor_conn.execute("SELECT count(*) FROM refunds WHERE amount + 0 = 7")
    after = await seq_scans(processor_conn)
    assert after["refunds"] == before["refunds"] + 1
