"""A batch's customer events, applied as a set, end exactly where one event at a time ends."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from processor.batching import EventBatcher
from shared import samples
from tests.integration.domain_helpers import Conn, rows, user
from tests.integration.test_intent_batch import (
    TWIN_EXAMPLES,
    State,
    batched,
    both_ways,
    delivery_order,
    intent_event,
    twin,
)
from tests.integration.test_invoice_batch import invoice_event
from tests.integration.test_subscription_batch import sub_event

__all__ = ["batched", "twin"]  # the fixtures, shared with the PaymentIntent sets' test

T = 1_800_000_000


def customer_event(
    customer: str,
    step: int,
    *,
    user_id: str | None = None,
    email: str | None = None,
    event_type: str = "customer.updated",
    flag_deleted: bool = True,
) -> dict[str, Any]:
    obj = samples.customer(customer_id=customer, user_id=user_id, email=email)
    if event_type == "customer.deleted" and flag_deleted:
        obj["deleted"] = True
    return samples.event(event_type, obj, created=T + step)


def orphans(customer: str) -> list[dict[str, Any]]:
    """A payment, a subscription and an invoice of ``customer`` that name no user: linked when its
    mapping appears, and the payment's and the subscription's entitlements derived then."""
    return [
        intent_event("payment_intent.succeeded", samples.new_id("pi"), 0, customer=customer),
        sub_event(samples.new_id("sub"), 0, customer=customer),
        invoice_event(samples.new_id("in"), 0, customer=customer),
    ]


# The entitlements of the customers' payments and subscriptions; a payment's by its PaymentIntent (its
# row id is random, so differs between the two databases).
ENTITLEMENTS = """
SELECT e.user_id::text, e.feature, e.source_type, e.product, e.active, e.reason, e.expires_at,
       e.revoked_at IS NOT NULL AS revoked, coalesce(p.stripe_payment_intent_id, e.source_id) AS source
  FROM entitlements e
  LEFT JOIN payments p ON e.source_type = 'payment' AND p.id::text = e.source_id
  LEFT JOIN subscriptions s ON e.source_type = 'subscription' AND s.id = e.source_id
 WHERE coalesce(p.stripe_customer_id, s.stripe_customer_id) = ANY(%s)
"""


def of_customers(customers: list[str]) -> State:
    async def read(conn: Conn, event_ids: list[str], since: int) -> dict[str, Any]:
        made = ("created_at", "updated_at")
        found = await rows(
            conn, "SELECT * FROM stripe_customers WHERE stripe_customer_id = ANY(%s)", customers
        )
        owned: dict[str, Any] = {}
        for table, key in (
            ("payments", "stripe_payment_intent_id"),
            ("subscriptions", "id"),
            ("invoices", "id"),
        ):
            for row in await rows(
                conn,
                f"SELECT {key} AS id, user_id::text FROM {table} WHERE stripe_customer_id = ANY(%s)",  # noqa: S608
                customers,
            ):
                owned[row["id"]] = row["user_id"]
        entitlements = await rows(conn, ENTITLEMENTS, customers)
        outbox = await rows(conn, "SELECT payload FROM outbox WHERE seq > %s ORDER BY seq", since)
        ledger = await rows(
            conn, "SELECT id, outcome, user_id::text FROM stripe_events WHERE id = ANY(%s)", event_ids
        )
        return {
            "customers": {
                c["stripe_customer_id"]: {k: v for k, v in c.items() if k not in made} for c in found
            },
            "owned": owned,
            "entitlements": sorted(entitlements, key=lambda e: (e["source"], e["feature"], e["user_id"])),
            "outbox": sorted(
                (
                    sorted(
                        (k, str(v))
                        for k, v in r["payload"].items()
                        if k not in ("id", "payment_id", "source_id")
                    )
                )
                for r in outbox
            ),
            "ledger": {r["id"]: (r["outcome"], r["user_id"]) for r in ledger},
        }

    return read


async def test_customer_events_applied_as_a_set_end_as_one_event_at_a_time(
    batched: tuple[EventBatcher, Conn], twin: str
) -> None:
    batcher, conn = batched
    ids = {name: samples.new_id("cus") for name in "ABCDEFGHI"}
    users = {name: user() for name in "ABCDEFGHI"}
    taken_elsewhere = samples.new_id("cus")
    before = [
        *orphans(ids["B"]),  # linked to B's user by the batch
        customer_event(ids["C"], 0, user_id=users["C"], event_type="customer.created"),
        customer_event(ids["D"], 5, email="newer@example.com", event_type="customer.created"),
        customer_event(ids["E"], 0, user_id=users["E"], event_type="customer.created"),
        # F's user already has another customer: F stays unmapped, but its rows are still linked
        customer_event(taken_elsewhere, 0, user_id=users["F"], event_type="customer.created"),
        *orphans(ids["F"]),
        customer_event(ids["I"], 5, event_type="customer.created"),  # newer than the batch's, no user
    ]
    created_a = customer_event(ids["A"], 1, user_id=users["A"], event_type="customer.created")
    batch = [
        created_a,  # new, with its user
        customer_event(ids["B"], 1, user_id=users["B"], event_type="customer.created"),
        customer_event(ids["C"], 1, email="changed@example.com"),  # no user named: the row's
        customer_event(ids["D"], 1, email="older@example.com"),  # older than the row: stale
        customer_event(ids["E"], 1, event_type="customer.deleted", flag_deleted=False),  # deleted by type
        customer_event(ids["F"], 1, user_id=users["F"], event_type="customer.created"),
        customer_event(ids["G"], 0, event_type="customer.created"),
        customer_event(ids["G"], 1, user_id=users["G"]),  # two events of one customer: per event
        created_a,  # a duplicate
        customer_event(ids["H"], 1),  # nobody's
        customer_event(ids["I"], 1, user_id=users["I"]),  # older than the row, but maps its user
    ]
    taken = batcher.customer_chains
    expected, one_by_one = await both_ways(
        batcher, conn, twin, before, batch, of_customers(list(ids.values()))
    )
    assert batcher.customer_chains - taken == 8  # all but G's chain (two events)

    # What the per-event path did, so the comparison above compares something.
    assert one_by_one.count("duplicate") == 1 and one_by_one.count("stale") == 1
    found = expected["customers"]
    assert str(found[ids["A"]]["user_id"]) == users["A"] and found[ids["F"]]["user_id"] is None
    assert found[ids["E"]]["deleted"] is True and found[ids["D"]]["email"] == "newer@example.com"
    assert sum(1 for u in expected["owned"].values() if u == users["B"]) == 3
    assert sum(1 for u in expected["owned"].values() if u == users["F"]) == 3
    assert {e["user_id"] for e in expected["entitlements"]} >= {users["B"], users["F"]}
    assert expected["ledger"][batch[2]["id"]] == ("applied", users["C"])
    assert expected["ledger"][batch[-1]["id"]] == ("applied", users["I"])


@st.composite
def histories(draw: st.DrawFn) -> dict[str, Any]:
    plans = []
    for _ in range(draw(st.integers(1, 6))):
        plans.append(
            {
                "before": draw(st.sampled_from(["none", "unmapped", "mapped", "deleted"])),
                "orphans": draw(st.booleans()),
                "user_taken": draw(st.booleans()),
                "events": draw(
                    st.lists(
                        st.tuples(
                            st.sampled_from(["customer.created", "customer.updated", "customer.deleted"]),
                            st.integers(-1, 3),
                            st.booleans(),  # names its user
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
async def test_any_customer_batch_ends_as_one_event_at_a_time(
    batched: tuple[EventBatcher, Conn], twin: str, history: dict[str, Any]
) -> None:
    batcher, conn = batched
    before: list[dict[str, Any]] = []
    built: dict[tuple[int, int], dict[str, Any]] = {}
    customers = []
    for k, plan in enumerate(history["plans"]):
        customer, person = samples.new_id("cus"), user()
        customers.append(customer)
        if plan["user_taken"]:
            before.append(
                customer_event(samples.new_id("cus"), 0, user_id=person, event_type="customer.created")
            )
        if plan["orphans"]:
            before.extend(orphans(customer))
        if plan["before"] != "none":
            before.append(
                customer_event(
                    customer,
                    1,
                    user_id=person if plan["before"] == "mapped" else None,
                    event_type="customer.deleted" if plan["before"] == "deleted" else "customer.created",
                )
            )
        for n, (event_type, step, names_user) in enumerate(plan["events"]):
            built[k, n] = customer_event(
                customer,
                1 + step,
                user_id=person if names_user else None,
                email=f"{k}-{n}@example.com",
                event_type=event_type,
            )
    batch = [built[ref] for ref in history["order"]]
    await both_ways(batcher, conn, twin, before, batch, of_customers(customers))
