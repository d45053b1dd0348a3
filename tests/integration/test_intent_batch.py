"""A batch's PaymentIntent chains, applied as sets, end exactly where one event at a time ends."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from processor.batching import EventBatcher
from processor.events.payments import STATUS_BY_EVENT
from processor.pipeline import EventPipeline
from shared import db, samples
from tests.integration.domain_helpers import CTX, HANDLERS, Conn, deliver, rows, user
from tests.support import database_url, unique

T = 1_800_000_000
CHARGE_EVENTS = (
    "charge.succeeded",
    "charge.updated",
    "charge.refunded",
    "charge.failed",
)  # every event's `created` is T plus a step, so the guard's order is the test's


class Delivery(msgspec.Struct):
    """The fields of an AMQP delivery the event path reads."""

    body: bytes
    type: str = "payment_intent.succeeded"
    routing_key: str = "payment_intent.succeeded"
    headers: dict[str, Any] = {}


def intent_event(
    event_type: str,
    intent: str,
    step: int,
    *,
    user_id: str | None = None,
    product: str | None = "course_bundle",
    customer: str | None = None,
    attempt: int | None = None,
) -> dict[str, Any]:
    status = {
        "payment_intent.created": "requires_payment_method",
        "payment_intent.payment_failed": "requires_payment_method",
    }.get(event_type, STATUS_BY_EVENT[event_type])
    obj = samples.payment_intent(
        intent_id=intent, user_id=user_id, status=status, product=product, customer=customer
    )
    if attempt is not None:  # metadata that differs from event to event
        obj["metadata"]["attempt"] = str(attempt)
    if event_type == "payment_intent.payment_failed":
        obj["last_payment_error"] = {
            "type": "card_error",
            "code": "card_declined",
            "decline_code": "expired_card",
        }
    return samples.event(event_type, obj, created=T + step)


@pytest.fixture
def twin() -> Iterator[str]:
    """A second migrated database, for the same events applied one at a time."""
    url = database_url(unique("paybus_test"))
    db.migrate(url)
    yield url
    db.drop_database(url)


@pytest.fixture
async def batched(database: str) -> AsyncIterator[tuple[EventBatcher, Conn]]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database, min_size=1, max_size=2, open=False)
    await pool.open()
    batcher = EventBatcher(EventPipeline(pool, HANDLERS, CTX), max_batch=100, linger=0.05)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        yield batcher, conn
    await batcher.close()
    await pool.close()


async def state(conn: Conn, intents: list[str], event_ids: list[str], since: int) -> dict[str, Any]:
    """Everything the events left (payments, charges, entitlements, outbox, ledger), with the ids a
    database makes itself replaced by PaymentIntent ids."""
    payments = await rows(conn, "SELECT * FROM payments WHERE stripe_payment_intent_id = ANY(%s)", intents)
    pi_of = {str(p["id"]): p["stripe_payment_intent_id"] for p in payments}
    made = ("id", "created_at", "updated_at")
    entitlements = await rows(
        conn,
        "SELECT user_id::text, feature, source_type, source_id, product, active, reason, expires_at,"
        " granted_at IS NOT NULL AS granted, revoked_at IS NOT NULL AS revoked"
        " FROM entitlements WHERE source_id = ANY(%s)",
        list(pi_of),
    )
    outbox = await rows(conn, "SELECT payload FROM outbox WHERE seq > %s ORDER BY seq", since)
    announced: dict[str, list[dict[str, Any]]] = {}
    for row in outbox:
        payload = {k: v for k, v in row["payload"].items() if k != "id"}
        for name in ("payment_id", "source_id"):
            if name in payload:
                payload[name] = pi_of[payload[name]]
        intent = payload.get("stripe_payment_intent_id") or payload["source_id"]
        announced.setdefault(intent, []).append(payload)  # in order within a PaymentIntent
    ledger = await rows(
        conn, "SELECT id, outcome, user_id::text FROM stripe_events WHERE id = ANY(%s)", event_ids
    )
    charges = await rows(conn, "SELECT * FROM charges WHERE stripe_payment_intent_id = ANY(%s)", intents)
    return {
        "payments": {
            p["stripe_payment_intent_id"]: {k: v for k, v in p.items() if k not in made} for p in payments
        },
        "entitlements": sorted(
            ({**e, "source_id": pi_of[e["source_id"]]} for e in entitlements),
            key=lambda e: (e["source_id"], e["feature"]),
        ),
        "outbox": announced,
        "ledger": {r["id"]: (r["outcome"], r["user_id"]) for r in ledger},
        "charges": {c["id"]: {k: v for k, v in c.items() if k not in made} for c in charges},
    }


async def last_seq(conn: Conn) -> int:
    found = await rows(conn, "SELECT coalesce(max(seq), 0) AS seq FROM outbox")
    return int(found[0]["seq"])


State = Callable[[Conn, list[str], int], Awaitable[dict[str, Any]]]


async def both_ways(
    batcher: EventBatcher,
    conn: Conn,
    twin: str,
    before: list[dict[str, Any]],
    batch: list[dict[str, Any]],
    state_of: State,
) -> tuple[dict[str, Any], list[str]]:
    """Deliver ``before`` to both databases, then ``batch`` as one batch here and one event at a time on
    the twin; both must end alike, as ``state_of(conn, the batch's event ids, outbox seq before)`` reads
    them. Returns the twin's state and outcomes."""
    event_ids = [e["id"] for e in batch]
    async with await psycopg.AsyncConnection.connect(twin, autocommit=True) as alone:
        for envelope in before:
            await deliver(conn, envelope)
            await deliver(alone, envelope)
        since_batched, since_alone = await last_seq(conn), await last_seq(alone)
        batches = batcher.batches
        results = await asyncio.gather(*(batcher(Delivery(samples.encode(e))) for e in batch))  # type: ignore[arg-type]
        assert results == [None] * len(batch)
        assert batcher.batches == batches + (len(batch) > 1)  # one shared transaction, not a fallback
        one_by_one: list[str] = [await deliver(alone, e) for e in batch]
        expected = await state_of(alone, event_ids, since_alone)
        assert await state_of(conn, event_ids, since_batched) == expected
    return expected, one_by_one


def of_intents(intents: list[str]) -> State:
    async def read(conn: Conn, event_ids: list[str], since: int) -> dict[str, Any]:
        return await state(conn, intents, event_ids, since)

    return read


async def test_intent_chains_applied_as_sets_end_as_one_event_at_a_time(
    batched: tuple[EventBatcher, Conn], twin: str
) -> None:
    batcher, conn = batched
    ids = {name: samples.new_id("pi") for name in "ABCDEFGHIJKLMNO"}
    users = {name: user() for name in "ABCDEFGHIJKLMNO"}
    customer_h, customer_j, customer_f = samples.new_id("cus"), samples.new_id("cus"), samples.new_id("cus")

    def pi(name: str, event_type: str, step: int, **kw: Any) -> dict[str, Any]:
        kw.setdefault("user_id", users[name])
        return intent_event(event_type, ids[name], step, **kw)

    # Already applied before the batch, in both databases.
    charge = samples.charge(intent_id=ids["G"], amount_refunded=10000)  # refunded in part before G's payment

    def charge_event(name: str, event_type: str, step: int, refunded: int = 0) -> dict[str, Any]:
        obj = samples.charge(charge_id=f"ch_{ids[name][3:]}", intent_id=ids[name], amount_refunded=refunded)
        return samples.event(event_type, obj, created=T + step)

    before = [
        pi("E", "payment_intent.created", 0),  # an open payment the batch makes succeed
        pi("K", "payment_intent.payment_failed", 0),  # a failed one the batch makes succeed
        pi("F", "payment_intent.succeeded", 0),  # a succeeded one: its entitlements exist
        samples.event("charge.succeeded", charge, created=T),  # a charge waiting for G's payment
        samples.event("customer.created", samples.customer(customer_id=customer_h, user_id=users["H"])),
        samples.event("refund.created", samples.refund(intent_id=ids["O"]), created=T),  # before O's payment
    ]
    succeeded_a = pi("A", "payment_intent.succeeded", 1)
    batch = [
        pi("A", "payment_intent.created", 0),
        pi("B", "payment_intent.requires_action", 0, product=None),
        succeeded_a,
        pi("C", "payment_intent.succeeded", 0, product="lifetime_reports"),
        pi("B", "payment_intent.payment_failed", 1, product=None),
        pi("D", "payment_intent.succeeded", 1),
        pi("D", "payment_intent.created", 0),  # older than D's success: stale
        pi("E", "payment_intent.succeeded", 2),
        pi("F", "payment_intent.succeeded", 0, customer=customer_f),  # learns a customer: per event
        pi("G", "payment_intent.succeeded", 1),  # its charge came first: per event
        pi("H", "payment_intent.succeeded", 1, user_id=None, customer=customer_h),  # the customer's user
        succeeded_a,  # the same event twice: a duplicate
        pi("I", "payment_intent.succeeded", 1, user_id=None),  # nobody's: nothing granted
        pi("J", "payment_intent.created", 0),
        pi("J", "payment_intent.succeeded", 1, customer=customer_j),  # learns its customer
        pi("K", "payment_intent.succeeded", 1),
        pi("L", "payment_intent.created", 0),
        charge_event("L", "charge.succeeded", 1),  # a charge between its PaymentIntent's events
        pi("L", "payment_intent.succeeded", 1),
        pi("M", "payment_intent.succeeded", 1),
        charge_event("M", "charge.succeeded", 1),  # after the success: settles to the same row
        m_updated := charge_event("M", "charge.updated", 1),  # says nothing new: stale
        pi("N", "payment_intent.succeeded", 1),
        charge_event("N", "charge.refunded", 2, refunded=49900),  # a full refund: per event
        pi("O", "payment_intent.created", 0),  # its refund came first: per event
        pi("O", "payment_intent.succeeded", 1),
    ]
    taken = batcher.intent_chains
    expected, one_by_one = await both_ways(batcher, conn, twin, before, batch, of_intents(list(ids.values())))
    assert batcher.intent_chains - taken == 11  # all but F's, G's, N's and O's chains

    # What the per-event path did, so the comparison above compares something.
    assert one_by_one.count("duplicate") == 1 and one_by_one.count("stale") == 2
    assert expected["ledger"][batch[6]["id"]] == ("stale", users["D"])
    assert expected["ledger"][batch[10]["id"]] == ("applied", users["H"])
    payments = expected["payments"]
    assert payments[ids["B"]]["status"] == "failed" and payments[ids["B"]]["last_error"] == "expired_card"
    assert payments[ids["F"]]["stripe_customer_id"] == customer_f
    assert payments[ids["J"]]["stripe_customer_id"] == customer_j
    assert payments[ids["K"]]["status"] == "succeeded" and payments[ids["K"]]["last_error"] is None
    assert payments[ids["O"]]["amount_refunded"] == 10000  # the refund that came first, folded in
    assert one_by_one[batch.index(m_updated)] == "stale"
    granted = {(e["source_id"], e["feature"], e["active"]) for e in expected["entitlements"]}
    assert {(ids[n], True) for n in "ACDEFGHJKLMO"} | {(ids["N"], False)} == {(s, a) for s, _, a in granted}
    assert [p["type"] for p in expected["outbox"][ids["A"]]] == ["payment.succeeded", "entitlement.granted"]
    assert [p["type"] for p in expected["outbox"][ids["B"]]] == ["payment.failed"]
    assert ids["F"] not in expected["outbox"]  # learning a customer announces nothing


# The random batches of the set paths' tests: `PAYBUS_PROPERTY_EXAMPLES` / 4 of them.
TWIN_EXAMPLES = settings(
    max_examples=int(os.environ.get("PAYBUS_PROPERTY_EXAMPLES", "200")) // 4,
    deadline=None,
    database=None,
    derandomize=not os.environ.get("PAYBUS_PROPERTY_EXPLORE"),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def delivery_order(draw: st.DrawFn, plans: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Every planned event, as (plan, event) references, in a drawn order, a few of them twice."""
    refs = [(k, n) for k, plan in enumerate(plans) for n in range(len(plan["events"]))]
    order = draw(st.permutations(refs))
    again = draw(st.lists(st.sampled_from(order), max_size=2))
    return [*order, *again]


@st.composite
def journeys(draw: st.DrawFn) -> dict[str, Any]:
    """A few PaymentIntents, each with a state before the batch, a user by some route, and 1-4 events of
    its own or of its two charges; the batch delivers them in a drawn order, a few of them twice."""
    plans = []
    for _ in range(draw(st.integers(1, 6))):
        plans.append(
            {
                "before": draw(
                    st.sampled_from(["none", "open", "failed", "succeeded", "charge", "refunded charge"])
                ),
                "who": draw(
                    st.sampled_from(["metadata", "metadata+customer", "mapped", "unmapped", "nobody"])
                ),
                "product": draw(st.sampled_from(["course_bundle", "lifetime_reports", None])),
                "events": draw(
                    st.lists(
                        st.tuples(
                            st.sampled_from([*sorted(STATUS_BY_EVENT), *CHARGE_EVENTS]),
                            st.integers(0, 3),
                            st.booleans(),  # a PaymentIntent event names the customer; a charge is the second
                            st.sampled_from([0, 0, 10000, 49900]),  # a charge's refunded amount
                        ),
                        min_size=1,
                        max_size=4,
                    )
                ),
            }
        )
    return {"plans": plans, "order": delivery_order(draw, plans)}


@TWIN_EXAMPLES
@given(journey=journeys())
async def test_any_intent_batch_ends_as_one_event_at_a_time(
    batched: tuple[EventBatcher, Conn], twin: str, journey: dict[str, Any]
) -> None:
    batcher, conn = batched
    before: list[dict[str, Any]] = []
    built: dict[tuple[int, int], dict[str, Any]] = {}
    intents = []
    for k, plan in enumerate(journey["plans"]):
        intent, person, customer = samples.new_id("pi"), user(), samples.new_id("cus")
        intents.append(intent)
        named = plan["who"] in ("metadata", "metadata+customer")
        with_customer = plan["who"] in ("metadata+customer", "mapped", "unmapped")
        if plan["who"] == "mapped":
            before.append(
                samples.event("customer.created", samples.customer(customer_id=customer, user_id=person))
            )
        kw = {"user_id": person if named else None, "product": plan["product"]}
        charge_ids = [f"ch_{intent[3:]}", f"ch_{intent[3:]}x"]
        if plan["before"] in ("charge", "refunded charge"):
            refunded = 10000 if plan["before"] == "refunded charge" else 0
            charge = samples.charge(charge_id=charge_ids[0], intent_id=intent, amount_refunded=refunded)
            before.append(samples.event("charge.updated", charge, created=T))
        elif plan["before"] != "none":
            event_type = {
                "open": "payment_intent.created",
                "failed": "payment_intent.payment_failed",
                "succeeded": "payment_intent.succeeded",
            }[plan["before"]]
            before.append(intent_event(event_type, intent, 0, **kw))
        for n, (event_type, step, flag, refunded) in enumerate(plan["events"]):
            if event_type in CHARGE_EVENTS:
                status = "failed" if event_type == "charge.failed" else "succeeded"
                obj = samples.charge(
                    charge_id=charge_ids[flag], intent_id=intent, amount_refunded=refunded, status=status
                )
                built[k, n] = samples.event(event_type, obj, created=T + step)
                continue
            customer_here = customer if with_customer and (flag or not named) else None
            built[k, n] = intent_event(event_type, intent, step, customer=customer_here, attempt=n, **kw)
    batch = [built[ref] for ref in journey["order"]]
    await both_ways(batcher, conn, twin, before, batch, of_intents(intents))
