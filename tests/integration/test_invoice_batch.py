"""A batch's invoice events, applied as a set, end exactly where one event at a time ends."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from processor.batching import EventBatcher
from shared import samples
from tests.integration.domain_helpers import Conn, rows, user
from tests.integration.test_intent_batch import TWIN_EXAMPLES, State, batched, both_ways, delivery_order, twin
from tests.integration.test_subscription_batch import sub_event

__all__ = ["batched", "twin"]  # the fixtures, shared with the PaymentIntent sets' test

T = 1_800_000_000
STATUSES = ("draft", "open", "paid", "void", "uncollectible")


def invoice_event(
    invoice_id: str,
    step: int,
    *,
    status: str = "paid",
    sub_id: str | None = None,
    customer: str | None = None,
    amount: int = 49900,
    user_id: str | None = None,
) -> dict[str, Any]:
    obj = samples.invoice(
        invoice_id=invoice_id, status=status, subscription_id=sub_id, customer=customer, amount=amount
    )
    if user_id:
        obj["metadata"] = {"user_id": user_id}
    event_type = {"paid": "invoice.paid", "void": "invoice.voided"}.get(status, "invoice.updated")
    return samples.event(event_type, obj, created=T + step)


def of_invoices(invoices: list[str]) -> State:
    async def read(conn: Conn, event_ids: list[str], since: int) -> dict[str, Any]:
        found = await rows(conn, "SELECT * FROM invoices WHERE id = ANY(%s)", invoices)
        ledger = await rows(
            conn, "SELECT id, outcome, user_id::text FROM stripe_events WHERE id = ANY(%s)", event_ids
        )
        return {
            "invoices": {
                i["id"]: {k: v for k, v in i.items() if k not in ("created_at", "updated_at")} for i in found
            },
            "ledger": {r["id"]: (r["outcome"], r["user_id"]) for r in ledger},
        }

    return read


async def test_invoice_events_applied_as_a_set_end_as_one_event_at_a_time(
    batched: tuple[EventBatcher, Conn], twin: str
) -> None:
    batcher, conn = batched
    ids = {name: samples.new_id("in") for name in "ABCDEFGH"}
    users = {name: user() for name in "ABCDEFGH"}
    customer_b, customer_c, sub_d = samples.new_id("cus"), samples.new_id("cus"), samples.new_id("sub")
    customer_e, customer_f = samples.new_id("cus"), samples.new_id("cus")
    before = [
        samples.event("customer.created", samples.customer(customer_id=customer_b, user_id=users["B"])),
        sub_event(sub_d, 0, user_id=users["D"]),  # D's user comes from its subscription
        invoice_event(ids["E"], 0, status="open", customer=customer_e),  # paid in the batch
        invoice_event(ids["F"], 5, status="paid", customer=customer_f),  # newer than the batch's: stale
    ]
    paid_a = invoice_event(ids["A"], 1, user_id=users["A"])
    batch = [
        paid_a,  # new, its user in metadata
        invoice_event(ids["B"], 1, customer=customer_b),  # the customer's user
        invoice_event(ids["C"], 1, customer=customer_c),  # nobody's
        invoice_event(ids["D"], 1, sub_id=sub_d, customer=samples.new_id("cus")),
        invoice_event(ids["E"], 1, status="paid", customer=customer_e),
        invoice_event(ids["F"], 1, status="open", customer=customer_f),
        invoice_event(ids["G"], 0, status="open"),
        invoice_event(ids["G"], 1, status="paid"),  # two events of one invoice: per event
        paid_a,  # a duplicate
        invoice_event(ids["H"], 0, status="void", amount=0),
    ]
    taken = batcher.invoice_chains
    expected, one_by_one = await both_ways(
        batcher, conn, twin, before, batch, of_invoices(list(ids.values()))
    )
    assert batcher.invoice_chains - taken == 7  # all but G's chain (two events)

    # What the per-event path did, so the comparison above compares something.
    assert one_by_one.count("duplicate") == 1 and one_by_one.count("stale") == 1
    found = expected["invoices"]
    assert str(found[ids["A"]]["user_id"]) == users["A"] and str(found[ids["B"]]["user_id"]) == users["B"]
    assert str(found[ids["D"]]["user_id"]) == users["D"] and found[ids["C"]]["user_id"] is None
    assert found[ids["E"]]["status"] == "paid" and found[ids["F"]]["status"] == "paid"


@st.composite
def histories(draw: st.DrawFn) -> dict[str, Any]:
    plans = []
    for _ in range(draw(st.integers(1, 6))):
        plans.append(
            {
                "before": draw(st.sampled_from(["none", *STATUSES])),
                "who": draw(st.sampled_from(["metadata", "mapped", "subscription", "nobody"])),
                "events": draw(
                    st.lists(
                        st.tuples(st.sampled_from(STATUSES), st.integers(-1, 3), st.sampled_from([0, 49900])),
                        min_size=1,
                        max_size=3,
                    )
                ),
            }
        )
    return {"plans": plans, "order": delivery_order(draw, plans)}


@TWIN_EXAMPLES
@given(history=histories())
async def test_any_invoice_batch_ends_as_one_event_at_a_time(
    batched: tuple[EventBatcher, Conn], twin: str, history: dict[str, Any]
) -> None:
    batcher, conn = batched
    before: list[dict[str, Any]] = []
    built: dict[tuple[int, int], dict[str, Any]] = {}
    invoices = []
    for k, plan in enumerate(history["plans"]):
        invoice_id, person, customer = samples.new_id("in"), user(), samples.new_id("cus")
        invoices.append(invoice_id)
        sub_id = samples.new_id("sub") if plan["who"] == "subscription" else None
        named = person if plan["who"] == "metadata" else None
        if plan["who"] == "mapped":
            before.append(
                samples.event("customer.created", samples.customer(customer_id=customer, user_id=person))
            )
        if sub_id:
            before.append(sub_event(sub_id, 0, user_id=person))
        if plan["before"] != "none":
            before.append(
                invoice_event(
                    invoice_id, 1, status=plan["before"], sub_id=sub_id, customer=customer, user_id=named
                )
            )
        for n, (status, step, amount) in enumerate(plan["events"]):
            built[k, n] = invoice_event(
                invoice_id,
                1 + step,
                status=status,
                sub_id=sub_id,
                customer=customer,
                amount=amount,
                user_id=named,
            )
    batch = [built[ref] for ref in history["order"]]
    await both_ways(batcher, conn, twin, before, batch, of_invoices(invoices))
