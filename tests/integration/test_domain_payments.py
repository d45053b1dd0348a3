"""payment_intent.*, checkout.session.*, charge.*, refund.* and charge.dispute.* from realistic payloads."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from processor.ledger import transaction
from processor.store import payment_effects, payments
from shared import samples
from tests.integration.domain_helpers import (
    CTX,
    Conn,
    active_features,
    deliver,
    one,
    outbox_types,
    rows,
    user,
)


def now() -> int:
    return int(time.time())


@pytest.mark.parametrize(
    ("event_type", "status"),
    [
        ("payment_intent.created", "open"),
        ("payment_intent.requires_action", "requires_action"),
        ("payment_intent.processing", "processing"),
        ("payment_intent.succeeded", "succeeded"),
        ("payment_intent.payment_failed", "failed"),
        ("payment_intent.canceled", "canceled"),
    ],
)
async def test_each_payment_intent_event_sets_the_payment_row(
    conn: Conn, event_type: str, status: str
) -> None:
    envelope = samples.sample_event(event_type)
    intent = envelope["data"]["object"]
    assert await deliver(conn, envelope) == "applied"
    row = await one(conn, "SELECT * FROM payments WHERE stripe_payment_intent_id = %s", intent["id"])
    assert row is not None
    assert (row["status"], row["amount"], row["currency"], str(row["user_id"])) == (
        status,
        intent["amount"],
        "inr",
        intent["metadata"]["user_id"],
    )
    assert row["last_error"] == ("generic_decline" if status == "failed" else None)
    assert (row["paid_at"] is not None) == (status == "succeeded")


async def test_a_failed_attempt_then_success_in_the_same_second_ends_succeeded_in_either_order(
    conn: Conn,
) -> None:
    for first, second in (("failed", "succeeded"), ("succeeded", "failed")):
        u, pi, t = user(), samples.new_id("pi"), now()
        events = {
            "failed": samples.event(
                "payment_intent.payment_failed", samples.payment_intent(intent_id=pi, user_id=u), created=t
            ),
            "succeeded": samples.event(
                "payment_intent.succeeded",
                samples.payment_intent(intent_id=pi, user_id=u, status="succeeded"),
                created=t,
            ),
        }
        await deliver(conn, events[first])
        outcome = await deliver(conn, events[second])
        assert outcome == ("applied" if second == "succeeded" else "stale")
        row = await one(conn, "SELECT status FROM payments WHERE stripe_payment_intent_id = %s", pi)
        assert row == {"status": "succeeded"}


async def test_a_retry_that_succeeds_later_wins_over_an_earlier_failure(conn: Conn) -> None:
    u, pi, t = user(), samples.new_id("pi"), now()
    await deliver(
        conn,
        samples.event(
            "payment_intent.succeeded",
            samples.payment_intent(intent_id=pi, user_id=u, status="succeeded"),
            created=t + 5,
        ),
    )
    assert (
        await deliver(
            conn,
            samples.event(
                "payment_intent.payment_failed", samples.payment_intent(intent_id=pi, user_id=u), created=t
            ),
        )
        == "stale"
    )
    assert await one(conn, "SELECT status FROM payments WHERE stripe_payment_intent_id = %s", pi) == {
        "status": "succeeded"
    }


async def test_a_one_time_purchase_grants_its_features_for_access_days_from_payment(conn: Conn) -> None:
    u, pi, t = user(), samples.new_id("pi"), now()
    obj = samples.payment_intent(intent_id=pi, user_id=u, status="succeeded", product="course_bundle")
    await deliver(conn, samples.event("payment_intent.succeeded", obj, created=t))
    row = await one(conn, "SELECT id, paid_at FROM payments WHERE stripe_payment_intent_id = %s", pi)
    assert row is not None
    ent = await one(conn, "SELECT * FROM entitlements WHERE user_id = %s", u)
    assert ent is not None
    assert (ent["feature"], ent["source_type"], ent["source_id"], ent["product"], ent["active"]) == (
        "course:bundle",
        "payment",
        str(row["id"]),
        "course_bundle",
        True,
    )
    assert (
        ent["expires_at"]
        == datetime.fromtimestamp(t, UTC) + timedelta(days=365)
        == row["paid_at"] + timedelta(days=365)
    )
    assert await active_features(conn, u) == {"course:bundle"}
    assert await outbox_types(conn, u) == ["payment.succeeded", "entitlement.granted"]


@pytest.mark.parametrize(
    ("event_type", "payment_status", "status"),
    [
        ("checkout.session.completed", "paid", "succeeded"),
        ("checkout.session.completed", "unpaid", "processing"),
        ("checkout.session.async_payment_succeeded", "paid", "succeeded"),
        ("checkout.session.async_payment_failed", "unpaid", "failed"),
        ("checkout.session.expired", "unpaid", "canceled"),
    ],
)
async def test_each_checkout_session_event_sets_the_session_payment(
    conn: Conn, event_type: str, payment_status: str, status: str
) -> None:
    u, cs, pi = user(), samples.new_id("cs_test"), samples.new_id("pi")
    session = samples.checkout_session(
        session_id=cs,
        intent_id=pi,
        payment_status=payment_status,
        client_reference_id=u,
        product="lifetime_reports",
        amount_total=99900,
    )
    assert await deliver(conn, samples.event(event_type, session)) == "applied"
    row = await one(conn, "SELECT * FROM payments WHERE stripe_checkout_session_id = %s", cs)
    assert row is not None
    assert (
        row["status"],
        row["stripe_payment_intent_id"],
        row["mode"],
        row["amount"],
        str(row["user_id"]),
        row["product"],
    ) == (status, pi, "payment", 99900, u, "lifetime_reports")
    assert await active_features(conn, u) == ({"reports"} if status == "succeeded" else set())


async def test_a_session_and_its_payment_intent_become_one_row_whatever_arrives_first(conn: Conn) -> None:
    u, cs, pi, t = user(), samples.new_id("cs_test"), samples.new_id("pi"), now()
    # The session's first event does not name the PaymentIntent yet; the PaymentIntent has its own row.
    await deliver(
        conn,
        samples.event(
            "checkout.session.completed",
            samples.checkout_session(
                session_id=cs, payment_status="unpaid", client_reference_id=u, product="lifetime_reports"
            ),
            created=t,
        ),
    )
    await deliver(
        conn, samples.event("payment_intent.processing", samples.payment_intent(intent_id=pi), created=t)
    )
    assert (
        len(
            await rows(
                conn,
                "SELECT 1 FROM payments WHERE stripe_checkout_session_id = %s"
                " OR stripe_payment_intent_id = %s",
                cs,
                pi,
            )
        )
        == 2
    )
    await deliver(
        conn,
        samples.event(
            "checkout.session.async_payment_succeeded",
            samples.checkout_session(
                session_id=cs, intent_id=pi, client_reference_id=u, product="lifetime_reports"
            ),
            created=t + 1,
        ),
    )
    merged = await rows(
        conn,
        "SELECT * FROM payments WHERE stripe_checkout_session_id = %s OR stripe_payment_intent_id = %s",
        cs,
        pi,
    )
    assert len(merged) == 1
    assert (
        merged[0]["stripe_checkout_session_id"],
        merged[0]["stripe_payment_intent_id"],
        merged[0]["status"],
        str(merged[0]["user_id"]),
        merged[0]["product"],
    ) == (cs, pi, "succeeded", u, "lifetime_reports")
    assert await active_features(conn, u) == {"reports"}


async def test_a_subscription_checkout_teaches_the_customer_user_and_links_the_subscription(
    conn: Conn,
) -> None:
    u, cs, cus, sub, t = (
        user(),
        samples.new_id("cs_test"),
        samples.new_id("cus"),
        samples.new_id("sub"),
        now(),
    )
    await deliver(
        conn,
        samples.event(
            "customer.subscription.created",
            samples.subscription(subscription_id=sub, customer=cus, status="active"),
            created=t,
        ),
    )
    assert await one(conn, "SELECT user_id FROM subscriptions WHERE id = %s", sub) == {"user_id": None}
    await deliver(
        conn,
        samples.event(
            "checkout.session.completed",
            samples.checkout_session(
                session_id=cs, mode="subscription", subscription_id=sub, customer=cus, client_reference_id=u
            ),
            created=t,
        ),
    )
    row = await one(
        conn, "SELECT mode, subscription_id, status FROM payments WHERE stripe_checkout_session_id = %s", cs
    )
    assert row == {"mode": "subscription", "subscription_id": sub, "status": "succeeded"}
    assert await one(
        conn, "SELECT user_id::text FROM stripe_customers WHERE stripe_customer_id = %s", cus
    ) == {"user_id": u}
    assert await one(conn, "SELECT user_id::text FROM subscriptions WHERE id = %s", sub) == {"user_id": u}
    # The subscription grants; the subscription-mode payment row itself grants nothing twice.
    assert {
        (r["feature"], r["source_type"])
        for r in await rows(
            conn, "SELECT feature, source_type FROM active_entitlements WHERE user_id = %s", u
        )
    } == {("premium", "subscription"), ("reports", "subscription")}


async def paid_purchase(conn: Conn, product: str = "lifetime_reports") -> tuple[str, str, str, int]:
    u, pi, ch, t = user(), samples.new_id("pi"), samples.new_id("ch"), now()
    await deliver(
        conn,
        samples.event(
            "payment_intent.succeeded",
            samples.payment_intent(intent_id=pi, user_id=u, status="succeeded", product=product),
            created=t,
        ),
    )
    return u, pi, ch, t


@pytest.mark.parametrize(
    ("event_type", "status"), [("charge.succeeded", "succeeded"), ("charge.failed", "failed")]
)
async def test_charge_events_record_the_charge_and_its_payment_intent(
    conn: Conn, event_type: str, status: str
) -> None:
    ch, pi = samples.new_id("ch"), samples.new_id("pi")
    assert await deliver(
        conn, samples.event(event_type, samples.charge(charge_id=ch, intent_id=pi, status=status))
    ) == ("applied")
    assert await one(
        conn, "SELECT stripe_payment_intent_id, status, amount, failure_code FROM charges WHERE id = %s", ch
    ) == {
        "stripe_payment_intent_id": pi,
        "status": status,
        "amount": 49900,
        "failure_code": "card_declined" if status == "failed" else None,
    }


async def test_a_partial_refund_keeps_access_and_a_full_refund_revokes_it(conn: Conn) -> None:
    u, pi, ch, t = await paid_purchase(conn)
    await deliver(
        conn,
        samples.event(
            "charge.refunded",
            samples.charge(charge_id=ch, intent_id=pi, amount_refunded=10000),
            created=t + 1,
        ),
    )
    assert await one(
        conn, "SELECT amount_refunded FROM payments WHERE stripe_payment_intent_id = %s", pi
    ) == {"amount_refunded": 10000}
    assert await active_features(conn, u) == {"reports"}
    await deliver(
        conn,
        samples.event(
            "charge.refunded",
            samples.charge(charge_id=ch, intent_id=pi, amount_refunded=49900),
            created=t + 2,
        ),
    )
    # An older snapshot arriving late cannot shrink the refunded amount.
    assert (
        await deliver(
            conn,
            samples.event(
                "charge.refunded",
                samples.charge(charge_id=ch, intent_id=pi, amount_refunded=10000),
                created=t + 1,
            ),
        )
        == "stale"
    )
    assert await one(
        conn, "SELECT amount_refunded, status FROM payments WHERE stripe_payment_intent_id = %s", pi
    ) == {"amount_refunded": 49900, "status": "succeeded"}
    assert await active_features(conn, u) == set()
    ent = await one(conn, "SELECT active, reason, revoked_at FROM entitlements WHERE user_id = %s", u)
    assert ent is not None and (ent["active"], ent["reason"]) == (False, "refunded") and ent["revoked_at"]
    assert await outbox_types(conn, u) == [
        "payment.succeeded",
        "entitlement.granted",
        "payment.refunded",
        "payment.refunded",
        "entitlement.revoked",
    ]


@pytest.mark.parametrize("event_type", ["refund.created", "refund.updated", "charge.refund.updated"])
async def test_refund_events_sum_succeeded_refunds_by_id(conn: Conn, event_type: str) -> None:
    u, pi, ch, t = await paid_purchase(conn)
    await deliver(
        conn, samples.event("charge.succeeded", samples.charge(charge_id=ch, intent_id=pi), created=t)
    )
    # The refund names only its charge; the charge row links it to the PaymentIntent.
    re1, re2 = samples.new_id("re"), samples.new_id("re")
    await deliver(
        conn, samples.event(event_type, samples.refund(refund_id=re1, charge_id=ch, amount=20000), created=t)
    )
    await deliver(
        conn,
        samples.event(
            event_type, samples.refund(refund_id=re2, charge_id=ch, amount=29900, intent_id=pi), created=t
        ),
    )
    await deliver(
        conn,
        samples.event(
            event_type, samples.refund(refund_id=re2, charge_id=ch, amount=29900, intent_id=pi), created=t
        ),
    )
    assert await one(
        conn, "SELECT amount_refunded FROM payments WHERE stripe_payment_intent_id = %s", pi
    ) == {"amount_refunded": 49900}
    assert await active_features(conn, u) == set()


async def test_a_failed_refund_is_recorded_but_not_counted(conn: Conn) -> None:
    u, pi, ch, t = await paid_purchase(conn)
    re = samples.new_id("re")
    await deliver(
        conn,
        samples.event(
            "refund.created",
            samples.refund(refund_id=re, intent_id=pi, charge_id=ch, amount=49900, status="pending"),
            created=t,
        ),
    )
    await deliver(
        conn,
        samples.event(
            "refund.failed",
            samples.refund(refund_id=re, intent_id=pi, charge_id=ch, amount=49900, status="failed"),
            created=t + 1,
        ),
    )
    assert await one(conn, "SELECT status FROM refunds WHERE id = %s", re) == {"status": "failed"}
    assert await one(
        conn, "SELECT amount_refunded FROM payments WHERE stripe_payment_intent_id = %s", pi
    ) == {"amount_refunded": 0}
    assert await active_features(conn, u) == {"reports"}


@pytest.mark.parametrize(("outcome", "features"), [("lost", set()), ("won", {"reports"})])
async def test_a_lost_dispute_revokes_and_a_won_one_restores(
    conn: Conn, outcome: str, features: set[str]
) -> None:
    u, pi, ch, t = await paid_purchase(conn)
    dp = samples.new_id("dp")
    await deliver(
        conn,
        samples.event(
            "charge.dispute.created",
            samples.dispute(dispute_id=dp, charge_id=ch, intent_id=pi, status="needs_response"),
            created=t + 1,
        ),
    )
    assert await one(
        conn, "SELECT disputed, dispute_status FROM payments WHERE stripe_payment_intent_id = %s", pi
    ) == {"disputed": True, "dispute_status": "open"}
    await deliver(
        conn,
        samples.event(
            "charge.dispute.closed",
            samples.dispute(dispute_id=dp, charge_id=ch, intent_id=pi, status=outcome),
            created=t + 2,
        ),
    )
    assert await one(conn, "SELECT status FROM disputes WHERE id = %s", dp) == {"status": outcome}
    assert await one(conn, "SELECT dispute_status FROM payments WHERE stripe_payment_intent_id = %s", pi) == {
        "dispute_status": outcome
    }
    assert await active_features(conn, u) == features


async def test_a_duplicate_or_stale_event_changes_nothing_and_emits_nothing(conn: Conn) -> None:
    u, pi, t = user(), samples.new_id("pi"), now()
    succeeded = samples.event(
        "payment_intent.succeeded",
        samples.payment_intent(intent_id=pi, user_id=u, status="succeeded", product="course_bundle"),
        created=t,
    )
    assert await deliver(conn, succeeded) == "applied"
    assert await deliver(conn, succeeded) == "duplicate"
    assert (
        await deliver(
            conn,
            samples.event(
                "payment_intent.processing",
                samples.payment_intent(intent_id=pi, user_id=u, product="course_bundle"),
                created=t + 9,
            ),
        )
        == "stale"
    )
    ledger = await rows(conn, "SELECT outcome FROM stripe_events WHERE object_id = %s ORDER BY created", pi)
    assert [r["outcome"] for r in ledger] == ["applied", "stale"]
    assert await outbox_types(conn, u) == ["payment.succeeded", "entitlement.granted"]


async def test_a_change_that_keeps_the_payment_intent_takes_the_row_as_updated_and_agrees_with_a_full_settle(
    conn: Conn,
) -> None:
    """`settle` skips recomputing refunds and disputes only when the change cannot have moved them.

    The refund and the dispute arrive before the payment: the new row must fold them in (a full
    settle). The later `succeeded` keeps the PaymentIntent, so the row as updated is taken as it is;
    it must equal what the full recomputation says, and the refunded purchase grants nothing.
    """
    u, pi, ch, t = user(), samples.new_id("pi"), samples.new_id("ch"), now()
    await deliver(
        conn,
        samples.event(
            "charge.refunded", samples.charge(charge_id=ch, intent_id=pi, amount_refunded=49900), created=t
        ),
    )
    await deliver(
        conn,
        samples.event(
            "charge.dispute.created",
            samples.dispute(
                dispute_id=samples.new_id("dp"), charge_id=ch, intent_id=pi, status="needs_response"
            ),
            created=t,
        ),
    )
    created = samples.payment_intent(intent_id=pi, user_id=u, product="lifetime_reports")
    await deliver(conn, samples.event("payment_intent.created", created, created=t + 1))
    derived = ("amount_refunded", "dispute_status", "disputed")
    expected = {"amount_refunded": 49900, "dispute_status": "open", "disputed": True}
    assert (
        await one(
            conn,
            "SELECT amount_refunded, dispute_status, disputed FROM payments WHERE "
            "stripe_payment_intent_id = %s",
            pi,
        )
        == expected
    )

    async with transaction(conn):
        change = await payments.apply(
            conn,
            payments.PaymentUpdate(
                intent=pi, session=None, status="succeeded", created=t + 2, amount=49900, currency="inr"
            ),
        )
        assert change.changed and change.before is not None and change.current is not None
        assert change.current["status"] == "succeeded"
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        recomputed = await (await cur.execute(payment_effects._SETTLE, {"id": change.payment_id})).fetchone()
        assert recomputed is not None
        assert {k: change.current[k] for k in derived} == {k: recomputed[k] for k in derived} == expected
        await payment_effects.settle(
            conn, change.payment_id, change.before, CTX, datetime.now(UTC), change.current
        )
    assert await active_features(conn, u) == set()
    assert await outbox_types(conn, u) == ["payment.refunded", "payment.succeeded"]

    # A session-only row that learns its PaymentIntent must be derived afresh: no shortcut.
    cs, pi2 = samples.new_id("cs_test"), samples.new_id("pi")
    await deliver(
        conn,
        samples.event("charge.refunded", samples.charge(intent_id=pi2, amount_refunded=1000), created=t),
    )
    await deliver(
        conn,
        samples.event(
            "checkout.session.completed",
            samples.checkout_session(session_id=cs, payment_status="unpaid", user_id=u),
            created=t,
        ),
    )
    async with transaction(conn):
        learned = await payments.apply(
            conn,
            payments.PaymentUpdate(
                intent=pi2, session=cs, status="succeeded", created=t + 1, amount=49900, currency="inr"
            ),
        )
        assert learned.changed and learned.current is None
        await payment_effects.settle(conn, learned.payment_id, learned.before, CTX, datetime.now(UTC))
    assert await one(
        conn, "SELECT amount_refunded FROM payments WHERE stripe_checkout_session_id = %s", cs
    ) == {"amount_refunded": 1000}
