"""Event batches: many messages share one transaction, and one bad message cannot hurt the others."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from psycopg_pool import AsyncConnectionPool

from processor import outbox
from processor.batching import EventBatcher
from processor.catalog import load_catalog
from processor.context import Context
from processor.errors import Reject
from processor.events import handlers
from processor.events.customers import map_customer
from processor.ledger import transaction
from processor.pipeline import EventPipeline
from processor.store.locks import Claims, enter_chain
from shared import samples
from shared.domain_events import PaymentFailed
from shared.envelope import H_RECEIVED_AT
from tests.integration.domain_helpers import CTX, PRO_PRICE, active_features, deliver, one, outbox_types
from tests.support import REPO


class Delivery(msgspec.Struct):
    """The fields of an AMQP delivery the event path reads (a real broker is not what is tested here)."""

    body: bytes
    type: str = "payment_intent.succeeded"
    routing_key: str = "payment_intent.succeeded"
    headers: dict[str, Any] = {}


@pytest.fixture
async def batcher(parts: tuple[EventBatcher, InMemorySpanExporter, EventPipeline]) -> Any:
    return parts[:2]


@pytest.fixture
async def parts(database: str) -> AsyncIterator[tuple[EventBatcher, InMemorySpanExporter, EventPipeline]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database, min_size=1, max_size=4, open=False)
    await pool.open()
    pipeline = EventPipeline(
        pool,
        handlers(),
        Context(catalog=load_catalog(REPO / "catalog.toml")),
        tracer=provider.get_tracer("t"),
    )
    batcher = EventBatcher(pipeline, max_batch=10, linger=0.05)
    yield batcher, exporter, pipeline
    await batcher.close()
    await pool.close()


async def _outcomes(conn: psycopg.AsyncConnection[Any], ids: list[str]) -> dict[str, str]:
    rows = await (
        await conn.execute("SELECT id, outcome FROM stripe_events WHERE id = ANY(%s)", (ids,))
    ).fetchall()
    return dict(rows)


async def test_ten_messages_commit_in_one_batch(batcher: Any, conn: psycopg.AsyncConnection[Any]) -> None:
    work, exporter = batcher
    envelopes = [samples.sample_event("payment_intent.succeeded") for _ in range(10)]
    await asyncio.gather(*(work(Delivery(samples.encode(e))) for e in envelopes))  # type: ignore[arg-type]
    ids = [e["id"] for e in envelopes]
    assert await _outcomes(conn, ids) == dict.fromkeys(ids, "applied")
    batches = [s for s in exporter.get_finished_spans() if s.name == "db apply_batch"]
    assert [s.attributes["paybus.batch_size"] for s in batches] == [10]
    assert len(batches[0].links) == 9  # the other messages' spans are linked to the shared transaction


async def test_a_bad_message_falls_back_alone_and_the_rest_are_applied(
    batcher: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    work, _ = batcher
    good = [samples.sample_event("payment_intent.succeeded") for _ in range(5)]
    bad = samples.sample_event("payment_intent.succeeded")
    bad["data"]["object"]["amount"] = "a lot"
    deliveries = [Delivery(samples.encode(e)) for e in [*good[:3], bad, *good[3:]]]
    results = await asyncio.gather(*(work(d) for d in deliveries), return_exceptions=True)  # type: ignore[arg-type]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], Reject) and errors[0].reason == "invalid-payload"
    assert results[3] is errors[0]
    ids = [e["id"] for e in good]
    assert await _outcomes(conn, [*ids, bad["id"]]) == {**dict.fromkeys(ids, "applied"), bad["id"]: "failed"}
    payments = await (
        await conn.execute(
            "SELECT count(*) FROM payments WHERE stripe_payment_intent_id = ANY(%s)",
            ([e["data"]["object"]["id"] for e in [*good, bad]],),
        )
    ).fetchone()
    assert payments == (5,)  # nothing half-written for the bad one
    for envelope in good:  # the failed batch's held outbox rows went with it: each written once, alone
        user = envelope["data"]["object"]["metadata"]["user_id"]
        assert await outbox_types(conn, user) == ["payment.succeeded"]


async def test_a_duplicate_inside_one_batch_is_applied_once(
    batcher: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    work, _ = batcher
    envelope = samples.sample_event("payment_intent.succeeded")
    body = samples.encode(envelope)
    await asyncio.gather(*(work(Delivery(body)) for _ in range(4)))  # type: ignore[arg-type]
    row = await (
        await conn.execute(
            "SELECT count(*) FROM payments WHERE stripe_payment_intent_id = %s",
            (envelope["data"]["object"]["id"],),
        )
    ).fetchone()
    assert row == (1,)
    assert await _outcomes(conn, [envelope["id"]]) == {envelope["id"]: "applied"}


async def test_a_backlog_drains_in_full_batches_one_at_a_time(
    batcher: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    """Messages that arrive while a batch runs wait for it and form the next one: no small concurrent
    batches that would contend for the same rows and connections."""
    work, exporter = batcher
    envelopes = [samples.sample_event("payment_intent.succeeded") for _ in range(35)]
    await asyncio.gather(*(work(Delivery(samples.encode(e))) for e in envelopes))  # type: ignore[arg-type]
    ids = [e["id"] for e in envelopes]
    assert await _outcomes(conn, ids) == dict.fromkeys(ids, "applied")
    batches = sorted(
        (s for s in exporter.get_finished_spans() if s.name == "db apply_batch"),
        key=lambda s: s.start_time or 0,
    )
    assert [s.attributes["paybus.batch_size"] for s in batches] == [10, 10, 10, 5]
    for earlier, later in zip(batches, batches[1:], strict=False):
        assert (later.start_time or 0) >= (earlier.end_time or 0), "two batches ran at the same time"


async def test_a_batch_of_events_already_applied_changes_nothing(
    batcher: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    work, exporter = batcher
    envelopes = [samples.sample_event("payment_intent.succeeded") for _ in range(10)]
    bodies = [samples.encode(e) for e in envelopes]
    await asyncio.gather(*(work(Delivery(b)) for b in bodies))  # type: ignore[arg-type]
    users = [e["data"]["object"]["metadata"]["user_id"] for e in envelopes]
    count = "SELECT count(*) FROM outbox WHERE user_id = ANY(%s::uuid[])"
    # a re-applied event would be re-stamped (processed_at is the applying transaction's time) even when
    # its handler changed nothing; a duplicate leaves its ledger row as it was
    stamps = "SELECT id, processed_at FROM stripe_events WHERE id = ANY(%s) ORDER BY id"
    ids = [e["id"] for e in envelopes]
    before = await (await conn.execute(count, (users,))).fetchone()
    stamped = await (await conn.execute(stamps, (ids,))).fetchall()
    assert before is not None and before[0] >= 10
    await asyncio.gather(*(work(Delivery(b)) for b in reversed(bodies)))  # type: ignore[arg-type]
    assert await (await conn.execute(count, (users,))).fetchone() == before
    assert await (await conn.execute(stamps, (ids,))).fetchall() == stamped
    batches = [
        s.attributes["paybus.batch_size"] for s in exporter.get_finished_spans() if s.name == "db apply_batch"
    ]
    assert batches == [10, 10]  # the second delivery went through the batch path too, as duplicates


# Chains: events of a batch that name no common object or user are applied side by side on the batch's
# connection; a key two chains reach all the same stops the batch, which runs again in order.


def _batch_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == "db apply_batch"]


def _run_again(exporter: InMemorySpanExporter, *, chains: int) -> list[str]:
    """Of the one batch run: check its number of chains; say why it ran again in order, if it did."""
    [batch] = _batch_spans(exporter)
    assert batch.attributes["paybus.chains"] == chains
    return [e.attributes["paybus.key_kind"] for e in batch.events if e.name == "entangled"]


async def _deliver_batch(work: EventBatcher, envelopes: list[dict[str, Any]]) -> list[Any]:
    deliveries = [Delivery(samples.encode(e), type=e["type"], routing_key=e["type"]) for e in envelopes]
    return await asyncio.gather(*(work(d) for d in deliveries), return_exceptions=True)  # type: ignore[arg-type]


async def test_independent_payments_are_applied_side_by_side_each_in_its_own_order(
    parts: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    work, exporter, pipeline = parts
    spans: list[tuple[str, str]] = []  # (PaymentIntent, "start" | "end") as the handlers ran
    on_payment_intent = pipeline.handlers["payment_intent.succeeded"]

    async def watched(c: psycopg.AsyncConnection[Any], event: Any, ctx: Context) -> Any:
        spans.append((event.data.object["id"], "start"))
        applied = await on_payment_intent(c, event, ctx)
        spans.append((event.data.object["id"], "end"))
        return applied

    for event_type in ("payment_intent.created", "payment_intent.succeeded", "payment_intent.payment_failed"):
        pipeline.handlers[event_type] = watched
    users = [str(uuid.uuid4()) for _ in range(5)]
    now = int(time.time())
    intents = [samples.new_id("pi") for _ in range(5)]
    created = [
        samples.event(
            "payment_intent.created",
            samples.payment_intent(intent_id=pi, user_id=u, product="course_bundle"),
            created=now,
        )
        for pi, u in zip(intents, users, strict=True)
    ]
    ended = [
        samples.event(
            "payment_intent.succeeded" if n < 3 else "payment_intent.payment_failed",
            samples.payment_intent(
                intent_id=pi,
                user_id=u,
                product="course_bundle",
                status="succeeded" if n < 3 else "requires_payment_method",
            ),
            created=now + 1,
        )
        for n, (pi, u) in enumerate(zip(intents, users, strict=True))
    ]
    results = await _deliver_batch(work, [*created, *ended])
    assert results == [None] * 10
    assert _run_again(exporter, chains=5) == []
    # side by side: a second PaymentIntent's handler starts before the first one's has ended
    assert spans.index((intents[1], "start")) < spans.index((intents[0], "end"))
    for pi in intents:  # and each PaymentIntent's own events in batch order, one after the other
        assert [step for i, step in spans if i == pi] == ["start", "end", "start", "end"]
    statuses = await (
        await conn.execute(
            "SELECT stripe_payment_intent_id, status FROM payments WHERE stripe_payment_intent_id = ANY(%s)",
            (intents,),
        )
    ).fetchall()
    assert dict(statuses) == {pi: ("succeeded" if n < 3 else "failed") for n, pi in enumerate(intents)}
    for n, u in enumerate(users):
        assert await outbox_types(conn, u) == (
            ["payment.succeeded", "entitlement.granted"] if n < 3 else ["payment.failed"]
        )
        assert bool(await active_features(conn, u)) == (n < 3)


async def test_chains_that_reach_one_payment_unnamed_are_applied_again_in_order(
    parts: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    """A refund naming only its charge settles the charge's payment, which the other chain is changing."""
    work, exporter, _ = parts
    u, pi, ch = str(uuid.uuid4()), samples.new_id("pi"), samples.new_id("ch")
    await deliver(
        conn, samples.event("payment_intent.created", samples.payment_intent(intent_id=pi, user_id=u))
    )
    await deliver(conn, samples.event("charge.succeeded", samples.charge(charge_id=ch, intent_id=pi)))
    succeeded = samples.event(
        "payment_intent.succeeded",
        samples.payment_intent(intent_id=pi, user_id=u, product="course_bundle", status="succeeded"),
    )
    refunded = samples.event("refund.created", samples.refund(charge_id=ch, amount=10000))
    results = await _deliver_batch(work, [succeeded, refunded])
    assert results == [None, None]
    assert _run_again(exporter, chains=2) == ["pi"]
    assert await _outcomes(conn, [succeeded["id"], refunded["id"]]) == {
        succeeded["id"]: "applied",
        refunded["id"]: "applied",
    }
    payment = await one(
        conn, "SELECT status, amount_refunded FROM payments WHERE stripe_payment_intent_id = %s", pi
    )
    assert payment == {"status": "succeeded", "amount_refunded": 10000}
    assert await outbox_types(conn, u) == ["payment.succeeded", "entitlement.granted", "payment.refunded"]


async def test_a_customer_linked_in_one_chain_stops_a_chain_on_its_unnamed_payment(
    parts: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    """Linking a customer's orphaned payments changes rows whose events need not name the customer."""
    work, exporter, _ = parts
    u, pi, cus = str(uuid.uuid4()), samples.new_id("pi"), samples.new_id("cus")
    orphan = samples.payment_intent(intent_id=pi, customer=cus, product="course_bundle")
    await deliver(conn, samples.event("payment_intent.created", orphan))
    succeeded = samples.event(  # an event that does not name the customer: nothing links the two chains
        "payment_intent.succeeded",
        samples.payment_intent(intent_id=pi, product="course_bundle", status="succeeded"),
    )
    mapped = samples.event("customer.created", samples.customer(customer_id=cus, user_id=u))
    assert await _deliver_batch(work, [succeeded, mapped]) == [None, None]
    assert _run_again(exporter, chains=2) == ["pi"]
    payment = await one(
        conn, "SELECT status, user_id::text FROM payments WHERE stripe_payment_intent_id = %s", pi
    )
    assert payment == {"status": "succeeded", "user_id": u}
    assert await active_features(conn, u)
    # in batch order: the payment succeeded for nobody yet, then the customer's user got its access
    assert await outbox_types(conn, u) == ["entitlement.granted"]


async def test_a_user_mapped_elsewhere_meanwhile_fails_the_shared_batch_and_each_event_applies_alone(
    parts: Any, conn: psycopg.AsyncConnection[Any], database: str
) -> None:
    """In a shared transaction the customer mapping takes no savepoint (it would undo the other chains):
    a unique violation from a concurrent mapping fails the batch, and alone each event applies."""
    work, exporter, _ = parts
    u, cus, elsewhere = str(uuid.uuid4()), samples.new_id("cus"), samples.new_id("cus")
    mapped = samples.event("customer.created", samples.customer(customer_id=cus, user_id=u))
    other = samples.event(
        "payment_intent.succeeded", samples.sample_event("payment_intent.succeeded")["data"]["object"]
    )
    async with await psycopg.AsyncConnection.connect(database) as rival:
        await rival.execute(
            "INSERT INTO stripe_customers (stripe_customer_id, user_id) VALUES (%s, %s)", (elsewhere, u)
        )  # not committed: the batch's INSERT of the same user waits on it
        batch = asyncio.create_task(_deliver_batch(work, [mapped, other]))
        async with asyncio.timeout(10):
            while not await (
                await conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%%INSERT INTO stripe_customers%%'"
                )
            ).fetchone():
                await asyncio.sleep(0.01)
        await rival.commit()
        assert await batch == [None, None]
    assert _run_again(exporter, chains=2) == []  # it failed, and then each event applied alone
    assert await _outcomes(conn, [mapped["id"], other["id"]]) == {
        mapped["id"]: "applied",
        other["id"]: "applied",
    }
    owners = await (
        await conn.execute(
            "SELECT stripe_customer_id, user_id::text FROM stripe_customers"
            " WHERE stripe_customer_id = ANY(%s)",
            ([cus, elsewhere],),
        )
    ).fetchall()
    assert dict(owners) == {cus: None, elsewhere: u}  # the user keeps the customer that won
    payment = await one(
        conn, "SELECT status FROM payments WHERE stripe_payment_intent_id = %s", other["data"]["object"]["id"]
    )
    assert payment == {"status": "succeeded"}  # the other chain's work was not undone with the mapping


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "alone"])
async def test_a_customer_is_mapped_with_a_savepoint_only_when_no_other_chain_shares_the_transaction(
    conn: psycopg.AsyncConnection[Any], tmp_path: Path, shared: bool
) -> None:
    """Rolling back to a savepoint would also undo whatever other chains sent since it was taken."""
    u, cus = str(uuid.uuid4()), samples.new_id("cus")
    trace = tmp_path / "libpq.trace"

    async def chain() -> None:
        if shared:
            enter_chain(Claims(), 0)
        with trace.open("w") as out:
            conn.pgconn.trace(out.fileno())
            try:
                async with transaction(conn):
                    await map_customer(conn, cus, u, CTX, datetime.now(UTC))
            finally:
                conn.pgconn.untrace()

    await asyncio.create_task(chain())  # a task of its own, as each chain of a batch runs in
    sent = trace.read_text()
    assert "INSERT INTO stripe_customers" in sent
    assert ("SAVEPOINT" in sent) is not shared
    assert await one(
        conn, "SELECT user_id::text FROM stripe_customers WHERE stripe_customer_id = %s", cus
    ) == {"user_id": u}


async def test_a_batch_records_each_ledger_row_as_a_lone_event_would(
    batcher: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    """The batch's one INSERT keeps the per-row rules: the ingress's receipt time (else now), a failed
    row re-opened and applied, a row marked for `replay --force` applied again and counted."""
    work, _ = batcher
    fresh, stamped, failed, marked = (samples.sample_event("payment_intent.succeeded") for _ in range(4))
    for envelope in (failed, marked):
        await deliver(conn, envelope)
    await conn.execute("UPDATE stripe_events SET outcome = 'failed' WHERE id = %s", (failed["id"],))
    await conn.execute(
        "DELETE FROM payments WHERE stripe_payment_intent_id = %s", (failed["data"]["object"]["id"],)
    )
    await conn.execute("UPDATE stripe_events SET reapply_requested_at = now() WHERE id = %s", (marked["id"],))
    received = "2026-11-26T21:00:00.123456+00:00"
    deliveries = [
        Delivery(samples.encode(fresh)),
        Delivery(samples.encode(stamped), headers={H_RECEIVED_AT: received}),
        Delivery(samples.encode(failed)),
        Delivery(samples.encode(marked)),
    ]
    before = datetime.now(UTC)
    assert await asyncio.gather(*(work(d) for d in deliveries)) == [None] * 4  # type: ignore[arg-type]
    ids = [e["id"] for e in (fresh, stamped, failed, marked)]
    rows = {
        r["id"]: r
        for r in await (
            await conn.cursor(row_factory=psycopg.rows.dict_row).execute(
                "SELECT id, outcome, received_at, reapply_count, reapply_requested_at,"
                " payload->>'id' AS payload_id FROM stripe_events WHERE id = ANY(%s)",
                (ids,),
            )
        ).fetchall()
    }
    assert {i: r["outcome"] for i, r in rows.items()} == dict.fromkeys(ids, "applied")
    assert {i: r["payload_id"] for i, r in rows.items()} == {i: i for i in ids}  # each payload in its row
    assert rows[stamped["id"]]["received_at"] == datetime.fromisoformat(received)
    assert rows[fresh["id"]]["received_at"] >= before - timedelta(seconds=5)
    assert rows[marked["id"]]["reapply_count"] == 1 and rows[marked["id"]]["reapply_requested_at"] is None
    payment = await one(
        conn,
        "SELECT status FROM payments WHERE stripe_payment_intent_id = %s",
        failed["data"]["object"]["id"],
    )
    assert payment == {"status": "succeeded"}  # the failed event's effect was applied this time


async def test_a_subscription_that_links_an_earlier_invoice_stops_the_chain_of_that_invoice(
    parts: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    """A new subscription gives its user to invoices that came first, rows its event does not name."""
    work, exporter, _ = parts
    u, sub, inv = str(uuid.uuid4()), samples.new_id("sub"), samples.new_id("in")
    await deliver(
        conn, samples.event("invoice.created", samples.invoice(invoice_id=inv, subscription_id=sub))
    )
    updated = samples.event(  # names no subscription: nothing links the two chains
        "invoice.paid", samples.invoice(invoice_id=inv, status="paid")
    )
    created = samples.event(
        "customer.subscription.created",
        samples.subscription(subscription_id=sub, user_id=u, price_id=PRO_PRICE),
    )
    assert await _deliver_batch(work, [updated, created]) == [None, None]
    assert _run_again(exporter, chains=2) == ["invoices"]
    invoice = await one(
        conn, "SELECT status, subscription_id, user_id::text FROM invoices WHERE id = %s", inv
    )
    assert invoice == {"status": "paid", "subscription_id": sub, "user_id": u}


async def test_a_batch_writes_its_outbox_rows_in_one_statement(
    database: str, conn: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    """The chains' domain events wait in the batch and go in one INSERT after the last chain."""
    trace = (tmp_path / "libpq.trace").open("w")

    async def traced(c: psycopg.AsyncConnection[Any]) -> None:
        c.pgconn.trace(trace.fileno())

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database, min_size=1, max_size=1, open=False, configure=traced
    )
    await pool.open()
    pipeline = EventPipeline(pool, handlers(), CTX)
    work = EventBatcher(pipeline, max_batch=10, linger=0.05)
    users = [str(uuid.uuid4()) for _ in range(5)]
    try:
        results = await _deliver_batch(
            work, [samples.sample_event("payment_intent.succeeded", user_id=u) for u in users]
        )
    finally:
        await work.close()
        await pool.close()
        trace.close()
    assert results == [None] * 5
    # Five rows each emitted alone would send the INSERT's text five times (psycopg prepares at the fifth).
    assert (tmp_path / "libpq.trace").read_text().count("INSERT INTO outbox") == 1
    for u in users:
        assert await outbox_types(conn, u) == ["payment.succeeded"]


async def test_outbox_rows_are_held_only_inside_a_batch(conn: psycopg.AsyncConnection[Any]) -> None:
    """A lone event (and anything after a batch, in the same task) writes its outbox row at once."""
    u = str(uuid.uuid4())
    event = PaymentFailed(
        id=str(uuid.uuid4()),
        occurred_at=datetime.now(UTC),
        user_id=u,
        payment_id=str(uuid.uuid4()),
        stripe_payment_intent_id=samples.new_id("pi"),
        stripe_checkout_session_id=None,
        amount=100,
        currency="inr",
        product=None,
        error="card_declined",
    )
    with outbox.held() as kept:
        await outbox.emit(conn, event)
    assert len(kept) == 1 and await outbox_types(conn, u) == []  # held: not written
    await outbox.emit(conn, event)
    assert await outbox_types(conn, u) == ["payment.failed"]
