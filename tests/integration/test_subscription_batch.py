"""A batch's subscription events, applied as a set, end exactly where one event at a time ends."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from processor.batching import EventBatcher
from shared import samples
from tests.integration.domain_helpers import Conn, rows, user
from tests.integration.test_intent_batch import TWIN_EXAMPLES, State, batched, both_ways, delivery_order, twin

__all__ = ["batched", "twin"]  # the fixtures, shared with the PaymentIntent sets' test

T = 1_800_000_000
PRO, TEAM = "price_1PgafmB7WZ01zgkW6dKueIc5", "price_1TeamMonthly00000000001"
UNKNOWN_PRICE = "price_1NotInTheCatalog0000001"


def sub_event(
    sub_id: str,
    step: int,
    *,
    status: str = "active",
    user_id: str | None = None,
    customer: str | None = None,
    price: str = PRO,
    period: int = 0,
    event_type: str = "customer.subscription.updated",
) -> dict[str, Any]:
    obj = samples.subscription(
        subscription_id=sub_id,
        status=status,
        customer=customer,
        price_id=price,
        user_id=user_id,
        period_start=T + period * 100,
        period_end=T + period * 100 + 30 * 86400,
    )
    return samples.event(event_type, obj, created=T + step)


async def state(
    conn: Conn, subs: list[str], invoices: list[str], event_ids: list[str], since: int
) -> dict[str, Any]:
    """Everything the events left: subscriptions, entitlements, outbox (per subscription, in order),
    invoices' users and the ledger."""
    made = ("created_at", "updated_at")
    found = await rows(conn, "SELECT * FROM subscriptions WHERE id = ANY(%s)", subs)
    entitlements = await rows(
        conn,
        "SELECT user_id::text, feature, source_type, source_id, product, active, reason, expires_at,"
        " granted_at IS NOT NULL AS granted, revoked_at IS NOT NULL AS revoked"
        " FROM entitlements WHERE source_id = ANY(%s)",
        subs,
    )
    outbox = await rows(conn, "SELECT payload FROM outbox WHERE seq > %s ORDER BY seq", since)
    announced: dict[str, list[dict[str, Any]]] = {}
    for row in outbox:
        payload = {k: v for k, v in row["payload"].items() if k != "id"}
        announced.setdefault(payload.get("subscription_id") or payload["source_id"], []).append(payload)
    ledger = await rows(
        conn, "SELECT id, outcome, user_id::text FROM stripe_events WHERE id = ANY(%s)", event_ids
    )
    linked = await rows(conn, "SELECT id, user_id::text FROM invoices WHERE id = ANY(%s)", invoices)
    return {
        "subscriptions": {s["id"]: {k: v for k, v in s.items() if k not in made} for s in found},
        "entitlements": sorted(entitlements, key=lambda e: (e["source_id"], e["feature"], e["user_id"])),
        "outbox": announced,
        "ledger": {r["id"]: (r["outcome"], r["user_id"]) for r in ledger},
        "invoices": {r["id"]: r["user_id"] for r in linked},
    }


def of_subscriptions(subs: list[str], invoices: list[str]) -> State:
    async def read(conn: Conn, event_ids: list[str], since: int) -> dict[str, Any]:
        return await state(conn, subs, invoices, event_ids, since)

    return read


async def test_subscription_events_applied_as_a_set_end_as_one_event_at_a_time(
    batched: tuple[EventBatcher, Conn], twin: str
) -> None:
    batcher, conn = batched
    names = "ABCDEFGHIJKL"
    ids = {name: samples.new_id("sub") for name in names}
    users = {name: user() for name in names}
    customer_f, customer_g, customer_l = samples.new_id("cus"), samples.new_id("cus"), samples.new_id("cus")
    invoice_g = samples.new_id("in")

    def sub(name: str, step: int, **kw: Any) -> dict[str, Any]:
        kw.setdefault("user_id", users[name])
        return sub_event(ids[name], step, **kw)

    before = [
        sub("B", 0),  # active, granting: the batch renews its period
        sub("C", 0),  # active: the batch cancels it
        sub("D", 0, status="trialing"),  # trialing: the batch makes it active (same features, new label)
        sub("E", 5),  # newer than the batch's event: stale
        samples.event("customer.created", samples.customer(customer_id=customer_f, user_id=users["F"])),
        samples.event(  # an invoice that comes before its subscription, with no user yet
            "invoice.created",
            samples.invoice(
                invoice_id=invoice_g, subscription_id=ids["G"], customer=customer_g, status="open"
            ),
            created=T,
        ),
        sub("K", 0, price=PRO),  # the batch moves it to the team plan
        sub("L", 0, user_id=None, customer=customer_l),  # nobody's: granted nothing yet
        samples.event("customer.created", samples.customer(customer_id=customer_l, user_id=users["L"])),
    ]
    created_a = sub("A", 0, event_type="customer.subscription.created")
    batch = [
        created_a,  # new, with its user in metadata
        sub("B", 1, period=1),
        sub("C", 1, status="canceled"),
        sub("D", 1),
        sub("E", 1, status="past_due"),
        sub("F", 0, user_id=None, customer=customer_f),  # the customer's user
        sub("G", 0, customer=customer_g),  # its invoice learns the user
        sub("H", 0, status="past_due"),  # granted until the period end and grace
        sub("I", 0, user_id=None),  # nobody's: nothing granted
        sub("J", 0),
        sub("J", 1, status="canceled"),  # two events of one subscription: per event
        created_a,  # the same event twice: a duplicate
        sub("K", 1, price=TEAM),
        sub("L", 1, user_id=None, customer=customer_l, price=UNKNOWN_PRICE),  # learns its user, no product
    ]
    taken = batcher.subscription_chains
    read = of_subscriptions(list(ids.values()), [invoice_g])
    expected, one_by_one = await both_ways(batcher, conn, twin, before, batch, read)
    assert batcher.subscription_chains - taken == 11  # all but J's chain (two events)

    # What the per-event path did, so the comparison above compares something.
    assert one_by_one.count("duplicate") == 1 and one_by_one.count("stale") == 1
    assert expected["invoices"] == {invoice_g: users["G"]}
    active = {(e["source_id"], e["feature"]) for e in expected["entitlements"] if e["active"]}
    assert (ids["A"], "premium") in active and (ids["K"], "team") in active
    assert not any(source == ids["C"] for source, _ in active)
    assert not any(source == ids["I"] for source, _ in active)
    assert [p["type"] for p in expected["outbox"][ids["C"]]] == [
        "subscription.updated",
        "entitlement.revoked",
        "entitlement.revoked",
    ]
    assert ids["E"] not in expected["outbox"]
    d_rows = [e for e in expected["entitlements"] if e["source_id"] == ids["D"]]
    assert {e["reason"] for e in d_rows} == {"active"}  # relabelled from trialing


@st.composite
def histories(draw: st.DrawFn) -> dict[str, Any]:
    """A few subscriptions, each with a state before the batch, a user by some route, and 1-3 events;
    the batch delivers them in a drawn order, a few of them twice."""
    statuses = ["active", "trialing", "past_due", "canceled", "unpaid", "incomplete", "paused"]
    plans = []
    for _ in range(draw(st.integers(1, 6))):
        plans.append(
            {
                "before": draw(st.sampled_from(["none", *statuses])),
                "who": draw(st.sampled_from(["metadata", "mapped", "unmapped", "nobody"])),
                "invoice": draw(st.booleans()),
                "events": draw(
                    st.lists(
                        st.tuples(
                            st.sampled_from(statuses),
                            st.integers(-1, 3),  # created: before or after the state before
                            st.sampled_from([PRO, TEAM, UNKNOWN_PRICE]),
                            st.integers(0, 2),  # the period
                        ),
                        min_size=1,
                        max_size=3,
                    )
                ),
            }
        )
    return {"plans": plans, "order": delivery_order(draw, plans)}


@TWIN_EXAMPLES
@given(history=histories())
async def test_any_subscription_batch_ends_as_one_event_at_a_time(
    batched: tuple[EventBatcher, Conn], twin: str, history: dict[str, Any]
) -> None:
    batcher, conn = batched
    before: list[dict[str, Any]] = []
    built: dict[tuple[int, int], dict[str, Any]] = {}
    subs, invoices = [], []
    for k, plan in enumerate(history["plans"]):
        sub_id, person, customer = samples.new_id("sub"), user(), samples.new_id("cus")
        subs.append(sub_id)
        named = person if plan["who"] == "metadata" else None
        with_customer = customer if plan["who"] != "nobody" else None
        if plan["who"] == "mapped":
            before.append(
                samples.event("customer.created", samples.customer(customer_id=customer, user_id=person))
            )
        if plan["invoice"]:
            invoice_id = samples.new_id("in")
            invoices.append(invoice_id)
            obj = samples.invoice(
                invoice_id=invoice_id, subscription_id=sub_id, customer=with_customer, status="open"
            )
            before.append(samples.event("invoice.created", obj, created=T))
        if plan["before"] != "none":
            before.append(sub_event(sub_id, 1, status=plan["before"], user_id=named, customer=with_customer))
        for n, (status, step, price, period) in enumerate(plan["events"]):
            built[k, n] = sub_event(
                sub_id,
                1 + step,
                status=status,
                user_id=named,
                customer=with_customer,
                price=price,
                period=period,
            )
    batch = [built[ref] for ref in history["order"]]
    await both_ways(batcher, conn, twin, before, batch, of_subscriptions(subs, invoices))
