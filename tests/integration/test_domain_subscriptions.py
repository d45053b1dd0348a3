"""customer.subscription.*, invoice.* and customer.* from realistic payloads: rows, access, user linking."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from shared import samples
from tests.integration.domain_helpers import (
    TEAM_PRICE,
    Conn,
    active_features,
    deliver,
    one,
    outbox_types,
    rows,
    user,
)

DAY = 86400


def ts(value: int) -> datetime:
    return datetime.fromtimestamp(value, UTC)


@pytest.mark.parametrize(
    ("event_type", "status"),
    [
        ("customer.subscription.created", "incomplete"),
        ("customer.subscription.updated", "active"),
        ("customer.subscription.deleted", "canceled"),
        ("customer.subscription.paused", "paused"),
        ("customer.subscription.resumed", "active"),
        ("customer.subscription.trial_will_end", "trialing"),
    ],
)
async def test_each_subscription_event_sets_the_subscription_row(
    conn: Conn, event_type: str, status: str
) -> None:
    u, sub, start = user(), samples.new_id("sub"), int(time.time())
    obj = samples.subscription(
        subscription_id=sub,
        status=status,
        user_id=u,
        period_start=start,
        canceled_at=start if status == "canceled" else None,
        trial_end=start + 7 * DAY if status == "trialing" else None,
        cancel_at_period_end=status == "active",
    )
    assert await deliver(conn, samples.event(event_type, obj)) == "applied"
    row = await one(conn, "SELECT * FROM subscriptions WHERE id = %s", sub)
    assert row is not None
    assert (
        row["status"],
        str(row["user_id"]),
        row["price_id"],
        row["product"],
        row["current_period_end"],
        row["cancel_at_period_end"],
    ) == (
        status,
        u,
        "price_1PgafmB7WZ01zgkW6dKueIc5",
        "pro_monthly",
        ts(start + 30 * DAY),
        status == "active",
    )
    assert row["trial_end"] == (ts(start + 7 * DAY) if status == "trialing" else None)
    assert row["canceled_at"] == (ts(start) if status == "canceled" else None)
    granted = status in ("active", "trialing")
    assert await active_features(conn, u) == ({"premium", "reports"} if granted else set())
    assert await outbox_types(conn, u) == ["subscription.updated"] + (
        ["entitlement.granted"] * 2 if granted else []
    )


@pytest.mark.parametrize(("api_version", "on_items"), [("2026-10-28.endive", True), ("2024-06-20", False)])
async def test_the_period_is_read_where_the_api_version_puts_it(
    conn: Conn, api_version: str, on_items: bool
) -> None:
    sub, start = samples.new_id("sub"), 1_800_000_000
    obj = samples.subscription(subscription_id=sub, period_start=start, periods_on_items=on_items)
    await deliver(conn, samples.event("customer.subscription.updated", obj, api_version=api_version))
    assert await one(
        conn, "SELECT current_period_start, current_period_end FROM subscriptions WHERE id = %s", sub
    ) == {"current_period_start": ts(start), "current_period_end": ts(start + 30 * DAY)}


async def test_past_due_keeps_access_until_the_period_end_plus_grace(conn: Conn) -> None:
    u, sub, t = user(), samples.new_id("sub"), int(time.time())
    await deliver(
        conn,
        samples.event(
            "customer.subscription.created",
            samples.subscription(subscription_id=sub, user_id=u, status="active", period_start=t - 31 * DAY),
            created=t - 2,
        ),
    )
    await deliver(
        conn,
        samples.event(
            "customer.subscription.updated",
            samples.subscription(
                subscription_id=sub, user_id=u, status="past_due", period_start=t - 31 * DAY
            ),
            created=t - 1,
        ),
    )
    ents = await rows(conn, "SELECT feature, active, expires_at FROM entitlements WHERE source_id = %s", sub)
    # The period ended a day ago; the default grace keeps access two more days, then the view drops it.
    assert {(e["feature"], e["active"], e["expires_at"]) for e in ents} == {
        ("premium", True, ts(t - DAY) + timedelta(days=3)),
        ("reports", True, ts(t - DAY) + timedelta(days=3)),
    }
    assert await active_features(conn, u) == {"premium", "reports"}
    await deliver(
        conn,
        samples.event(
            "customer.subscription.updated",
            samples.subscription(
                subscription_id=sub, user_id=u, status="past_due", period_start=t - 40 * DAY
            ),
            created=t,
        ),
    )
    assert await active_features(conn, u) == set()  # grace over: expires_at is in the past
    # A newer event that says active again is a recovery, not a regression.
    await deliver(
        conn,
        samples.event(
            "customer.subscription.updated",
            samples.subscription(subscription_id=sub, user_id=u, status="active", period_start=t),
            created=t + 1,
        ),
    )
    assert await active_features(conn, u) == {"premium", "reports"}


@pytest.mark.parametrize("end", ["canceled", "unpaid", "paused", "incomplete_expired"])
async def test_ending_states_revoke_access(conn: Conn, end: str) -> None:
    u, sub, t = user(), samples.new_id("sub"), int(time.time())
    await deliver(
        conn,
        samples.event(
            "customer.subscription.created",
            samples.subscription(subscription_id=sub, user_id=u, status="active"),
            created=t,
        ),
    )
    await deliver(
        conn,
        samples.event(
            "customer.subscription.updated",
            samples.subscription(subscription_id=sub, user_id=u, status=end),
            created=t + 1,
        ),
    )
    assert await active_features(conn, u) == set()
    reasons = await rows(conn, "SELECT DISTINCT reason FROM entitlements WHERE source_id = %s", sub)
    assert reasons == [{"reason": end}]
    assert (await outbox_types(conn, u))[-2:] == ["entitlement.revoked", "entitlement.revoked"]


async def test_canceled_never_regresses_even_to_a_newer_update(conn: Conn) -> None:
    u, sub, t = user(), samples.new_id("sub"), int(time.time())
    await deliver(
        conn,
        samples.event(
            "customer.subscription.deleted",
            samples.subscription(subscription_id=sub, user_id=u, status="canceled", canceled_at=t),
            created=t,
        ),
    )
    assert (
        await deliver(
            conn,
            samples.event(
                "customer.subscription.updated",
                samples.subscription(subscription_id=sub, user_id=u, status="active"),
                created=t + 5,
            ),
        )
        == "stale"
    )
    assert await one(conn, "SELECT status FROM subscriptions WHERE id = %s", sub) == {"status": "canceled"}
    assert await active_features(conn, u) == set()


async def test_a_plan_change_grants_the_new_features_and_revokes_the_dropped_ones(conn: Conn) -> None:
    u, sub, t = user(), samples.new_id("sub"), int(time.time())
    await deliver(
        conn,
        samples.event(
            "customer.subscription.created",
            samples.subscription(subscription_id=sub, user_id=u, status="active", price_id=TEAM_PRICE),
            created=t,
        ),
    )
    assert await active_features(conn, u) == {"premium", "reports", "team"}
    await deliver(
        conn,
        samples.event(
            "customer.subscription.updated",
            samples.subscription(subscription_id=sub, user_id=u, status="active"),
            created=t + 1,
        ),
    )
    assert await active_features(conn, u) == {"premium", "reports"}
    assert await one(conn, "SELECT product FROM subscriptions WHERE id = %s", sub) == {
        "product": "pro_monthly"
    }
    assert await one(
        conn, "SELECT reason FROM entitlements WHERE source_id = %s AND feature = 'team'", sub
    ) == {"reason": "product-changed"}


@pytest.mark.parametrize(
    ("event_type", "status"),
    [
        ("invoice.finalized", "open"),
        ("invoice.paid", "paid"),
        ("invoice.payment_failed", "open"),
        ("invoice.payment_action_required", "open"),
        ("invoice.voided", "void"),
        ("invoice.marked_uncollectible", "uncollectible"),
    ],
)
async def test_each_invoice_event_sets_the_invoice_row_with_its_links(
    conn: Conn, event_type: str, status: str
) -> None:
    u, sub, cus, inv, t = (
        user(),
        samples.new_id("sub"),
        samples.new_id("cus"),
        samples.new_id("in"),
        int(time.time()),
    )
    await deliver(
        conn,
        samples.event(
            "customer.subscription.created",
            samples.subscription(subscription_id=sub, customer=cus, user_id=u),
            created=t,
        ),
    )
    await deliver(
        conn,
        samples.event(
            event_type,
            samples.invoice(
                invoice_id=inv, status=status, subscription_id=sub, customer=cus, amount=49900, period_start=t
            ),
            created=t,
        ),
    )
    row = await one(conn, "SELECT * FROM invoices WHERE id = %s", inv)
    assert row is not None
    # The invoice's user comes from its subscription: the invoice itself names only the customer.
    assert (
        row["status"],
        row["subscription_id"],
        str(row["user_id"]),
        row["amount_due"],
        row["currency"],
        row["period_end"],
    ) == (status, sub, u, 49900, "inr", ts(t + 30 * DAY))
    assert row["amount_paid"] == (49900 if status == "paid" else 0)
    assert row["hosted_invoice_url"] == f"https://invoice.stripe.com/i/{inv}"
    assert row["invoice_pdf"] == f"https://pay.stripe.com/invoice/{inv}/pdf"


async def test_an_old_api_invoice_names_its_subscription_at_the_top(conn: Conn) -> None:
    inv, sub = samples.new_id("in"), samples.new_id("sub")
    obj = samples.invoice(invoice_id=inv, subscription_id=None)
    obj.pop("parent")
    obj["subscription"] = sub
    await deliver(conn, samples.event("invoice.paid", obj, api_version="2024-06-20"))
    assert await one(conn, "SELECT subscription_id FROM invoices WHERE id = %s", inv) == {
        "subscription_id": sub
    }


async def test_a_paid_invoice_is_not_reopened_by_a_late_failure(conn: Conn) -> None:
    inv, t = samples.new_id("in"), int(time.time())
    await deliver(
        conn, samples.event("invoice.paid", samples.invoice(invoice_id=inv, status="paid"), created=t)
    )
    assert (
        await deliver(
            conn,
            samples.event(
                "invoice.payment_failed", samples.invoice(invoice_id=inv, status="open"), created=t + 3
            ),
        )
        == "stale"
    )
    assert await one(conn, "SELECT status FROM invoices WHERE id = %s", inv) == {"status": "paid"}


@pytest.mark.parametrize("event_type", ["customer.created", "customer.updated", "customer.deleted"])
async def test_each_customer_event_sets_the_customer_row(conn: Conn, event_type: str) -> None:
    u, cus = user(), samples.new_id("cus")
    obj = samples.customer(customer_id=cus, user_id=u, email="someone@example.com")
    assert await deliver(conn, samples.event(event_type, obj)) == "applied"
    assert await one(
        conn, "SELECT user_id::text, email, deleted FROM stripe_customers WHERE stripe_customer_id = %s", cus
    ) == {"user_id": u, "email": "someone@example.com", "deleted": event_type == "customer.deleted"}


async def test_a_second_customer_of_a_user_stays_unmapped_but_its_rows_are_linked(conn: Conn) -> None:
    """`user_id` is unique in `stripe_customers`: the user keeps its first customer; the second one's
    rows still belong to the user the event names."""
    u, first, second, pi = user(), samples.new_id("cus"), samples.new_id("cus"), samples.new_id("pi")
    await deliver(conn, samples.event("customer.created", samples.customer(customer_id=first, user_id=u)))
    await deliver(
        conn,
        samples.event(
            "payment_intent.succeeded",
            samples.payment_intent(
                intent_id=pi, customer=second, status="succeeded", product="course_bundle"
            ),
        ),
    )
    assert (
        await deliver(
            conn, samples.event("customer.created", samples.customer(customer_id=second, user_id=u))
        )
        == "applied"
    )
    owners = await rows(
        conn,
        "SELECT stripe_customer_id, user_id::text FROM stripe_customers WHERE stripe_customer_id = ANY(%s)"
        " ORDER BY stripe_customer_id = %s DESC",
        [first, second],
        first,
    )
    assert owners == [
        {"stripe_customer_id": first, "user_id": u},
        {"stripe_customer_id": second, "user_id": None},
    ]
    assert await one(conn, "SELECT user_id::text FROM payments WHERE stripe_payment_intent_id = %s", pi) == {
        "user_id": u
    }
    assert await active_features(conn, u) == {"course:bundle"}


async def test_rows_of_an_unknown_customer_are_linked_when_the_mapping_appears(conn: Conn) -> None:
    u, cus, pi, sub, inv = (
        user(),
        samples.new_id("cus"),
        samples.new_id("pi"),
        samples.new_id("sub"),
        samples.new_id("in"),
    )
    t = int(time.time())
    await deliver(
        conn,
        samples.event(
            "payment_intent.succeeded",
            samples.payment_intent(intent_id=pi, customer=cus, status="succeeded", product="course_bundle"),
            created=t,
        ),
    )
    await deliver(
        conn,
        samples.event(
            "customer.subscription.created",
            samples.subscription(subscription_id=sub, customer=cus, status="trialing", trial_end=t + 7 * DAY),
            created=t,
        ),
    )
    await deliver(
        conn, samples.event("invoice.paid", samples.invoice(invoice_id=inv, customer=cus), created=t)
    )
    unmapped = await rows(
        conn,
        "SELECT 'payment' AS kind FROM payments WHERE user_id IS NULL AND stripe_customer_id = %s"
        " UNION ALL SELECT 'subscription' FROM subscriptions WHERE user_id IS NULL AND"
        " stripe_customer_id = %s UNION ALL SELECT 'invoice' FROM invoices WHERE user_id IS NULL"
        " AND stripe_customer_id = %s",
        cus,
        cus,
        cus,
    )
    assert sorted(r["kind"] for r in unmapped) == ["invoice", "payment", "subscription"]
    await deliver(
        conn, samples.event("customer.updated", samples.customer(customer_id=cus, user_id=u), created=t)
    )
    for table in ("payments", "subscriptions", "invoices"):
        found = await rows(conn, f"SELECT user_id::text FROM {table} WHERE stripe_customer_id = %s", cus)  # noqa: S608
        assert found == [{"user_id": u}], table
    assert await active_features(conn, u) == {"course:bundle", "premium", "reports"}
    assert sorted(await outbox_types(conn, u)) == ["entitlement.granted"] * 3


async def test_an_invoice_that_arrives_before_its_subscription_learns_the_subscriptions_user(
    conn: Conn,
) -> None:
    u, sub, inv, cus = user(), samples.new_id("sub"), samples.new_id("in"), samples.new_id("cus")
    await deliver(
        conn,
        samples.event("invoice.paid", samples.invoice(invoice_id=inv, subscription_id=sub, customer=cus)),
    )
    assert await one(conn, "SELECT user_id FROM invoices WHERE id = %s", inv) == {"user_id": None}
    await deliver(
        conn,
        samples.event(
            "customer.subscription.created",
            samples.subscription(subscription_id=sub, customer=cus, user_id=u),
        ),
    )
    assert await one(conn, "SELECT user_id::text FROM invoices WHERE id = %s", inv) == {"user_id": u}
