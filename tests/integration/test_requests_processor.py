"""Payment requests against real Postgres and a fake Stripe: validation, idempotency, customers, each kind."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest

from processor.stripe_api import StripeTransient
from tests.fakes.harness import InProcess, fake_stripe_fixture, in_process_fixture, new_key, new_user  # noqa: F401
from tests.fakes.stripe_fake import FakeStripe

Conn = psycopg.AsyncConnection[tuple[Any, ...]]


async def request_row(conn: Conn, key: str) -> tuple[Any, ...] | None:
    cur = await conn.execute(
        "SELECT kind, user_id::text, status, response, stripe_object_id FROM payment_requests"
        " WHERE idempotency_key = %s",
        (key,),
    )
    return await cur.fetchone()


USER = "5b0c1f4e-8a53-4d0c-9a4a-0d4f6c2b9e11"


def body(kind: str = "payment_intent.create", drop: str = "", **fields: Any) -> bytes:
    """A request body with a valid base (key "k", USER, 5000 paise) changed by ``fields``."""
    base: dict[str, Any] = {"kind": kind, "idempotency_key": "k", "user_id": USER}
    if kind == "payment_intent.create":
        base["amount"] = 5000
    base.update(fields)
    base.pop(drop, None)
    return json.dumps(base).encode()


CHECKOUT = "checkout_session.create"
INVALID_CASES = [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (body("payment_intent.refund"), "unknown request kind 'payment_intent.refund'"),
    (body(drop="idempotency_key"), "missing required field `idempotency_key`"),
    (body(user_id="42"), "Invalid UUID - at `$.user_id`"),
    (body(amount=-100), "at `$.amount`"),
    (body(amount=100_000_000_000), "<= 99999999 - at `$.amount`"),
    (body(currency="xyz"), "unsupported currency 'xyz'"),
    (body(amount=10), "below Stripe's minimum of 50 for inr"),
    (body(amount="5000"), "Expected `int`, got `str` - at `$.amount`"),
    (body(tip=1), "unknown field `tip`"),
    (body(idempotency_key="k\u0000"), "NUL"),
    (body(CHECKOUT, product="gold_plan"), "unknown product 'gold_plan'"),
    (body(CHECKOUT), "missing product"),
    (body(CHECKOUT, mode="subscription", product="course_bundle"), "is a payment product, not subscription"),
    (body(CHECKOUT, mode="subscription", amount=5000), "a subscription checkout needs a catalog product"),
    (body("refund.create"), "exactly one of payment_id or payment_intent_id"),
    (body("subscription.change", subscription_id="sub_1", product="course_bundle"), "is a payment product"),
]


@pytest.mark.parametrize(("body", "expected"), INVALID_CASES)
async def test_bad_input_is_answered_invalid_request_with_a_precise_message(
    in_process: InProcess, conn: Conn, body: bytes, expected: str
) -> None:
    kind = json.loads(body).get("kind") if body.startswith(b'{"') else "payment_intent.create"
    reply = await in_process.processor.process(body, kind)
    assert reply.ok is False and reply.error is not None
    assert reply.error.code == "invalid_request"
    assert expected in reply.error.message
    assert reply.error.retryable is False
    assert await request_row(conn, "k") is None  # nothing written for a request that was never valid


async def test_checkout_payment_mode_maps_back_to_the_user_and_records_an_open_payment(
    in_process: InProcess, fake_stripe: FakeStripe, conn: Conn
) -> None:
    user, key = new_user(), new_key()
    reply = await in_process.send(
        "checkout_session.create", idempotency_key=key, user_id=user, product="course_bundle", quantity=2
    )
    assert reply["ok"] is True, reply
    result = reply["result"]
    assert result["url"].startswith("https://checkout.stripe.com/")
    assert (result["mode"], result["amount"], result["currency"]) == ("payment", 599800, "inr")
    call = next(c for c in fake_stripe.calls_to("/v1/checkout/sessions") if c.key == f"paybus:{key}:checkout")
    assert call.version == "2026-10-28.endive"
    assert call.params["client_reference_id"] == user
    assert (
        call.params["metadata"]["user_id"] == user and call.params["metadata"]["product"] == "course_bundle"
    )
    assert call.params["payment_intent_data"]["metadata"]["user_id"] == user
    assert call.params["line_items"] == [{"price": "price_1CourseBundle000000000001", "quantity": "2"}]
    assert call.params["customer"].startswith("cus_")
    cur = await conn.execute(
        "SELECT id::text, user_id::text, status, mode, amount, product, stripe_customer_id FROM payments"
        " WHERE stripe_checkout_session_id = %s",
        (result["session_id"],),
    )
    assert await cur.fetchone() == (
        result["payment_id"],
        user,
        "open",
        "payment",
        599800,
        "course_bundle",
        call.params["customer"],
    )
    row = await request_row(conn, key)
    assert row is not None and row[:3] == ("checkout_session.create", user, "succeeded")
    assert row[3] == reply and row[4] == result["session_id"]


async def test_checkout_subscription_mode_puts_the_mapping_on_the_subscription(
    in_process: InProcess, fake_stripe: FakeStripe
) -> None:
    user, key = new_user(), new_key()
    reply = await in_process.send(
        "checkout_session.create",
        idempotency_key=key,
        user_id=user,
        product="pro_monthly",
        mode="subscription",
    )
    assert reply["ok"] is True and reply["result"]["mode"] == "subscription"
    call = fake_stripe.calls_to("/v1/checkout/sessions")[-1]
    assert call.params["mode"] == "subscription"
    assert call.params["subscription_data"]["metadata"] == {
        "user_id": user,
        "product": "pro_monthly",
        "paybus_request": key,
    }
    assert "payment_intent_data" not in call.params


async def test_checkout_with_a_dynamic_amount_uses_price_data(
    in_process: InProcess, fake_stripe: FakeStripe
) -> None:
    reply = await in_process.send(
        "checkout_session.create",
        idempotency_key=new_key(),
        user_id=new_user(),
        amount=12345,
        currency="usd",
        description="Consulting",
    )
    assert reply["ok"] is True and reply["result"]["amount"] == 12345
    item = fake_stripe.calls_to("/v1/checkout/sessions")[-1].params["line_items"][0]
    assert item["price_data"] == {
        "currency": "usd",
        "unit_amount": "12345",
        "product_data": {"name": "Consulting"},
    }


async def test_a_repeat_returns_the_stored_reply_even_after_stripe_forgot_the_key(
    in_process: InProcess, fake_stripe: FakeStripe
) -> None:
    user, key = new_user(), new_key()
    first = await in_process.send(
        "checkout_session.create", idempotency_key=key, user_id=user, product="pro_monthly"
    )
    fake_stripe._replies.clear()  # Stripe prunes keys after 24 hours
    calls = len(fake_stripe.calls)
    again = await in_process.send(
        "checkout_session.create", idempotency_key=key, user_id=user, product="pro_monthly"
    )
    assert again == first
    assert len(fake_stripe.calls) == calls  # answered from payment_requests; Stripe not asked again


async def test_the_same_key_with_other_parameters_is_refused(in_process: InProcess, conn: Conn) -> None:
    user, key = new_user(), new_key()
    first = await in_process.send("payment_intent.create", idempotency_key=key, user_id=user, amount=5000)
    assert first["ok"] is True
    other = await in_process.send("payment_intent.create", idempotency_key=key, user_id=user, amount=6000)
    assert other == {
        "ok": False,
        "error": {
            "code": "invalid_request",
            "retryable": False,
            "decline_code": None,
            "message": f"idempotency_key {key!r} was already used for a different request",
        },
    }
    row = await request_row(conn, key)
    assert row is not None and row[3] == first  # the stored reply is untouched


async def test_payment_intent_reply_carries_client_secret_and_publishable_key(
    in_process: InProcess, conn: Conn
) -> None:
    user, key = new_user(), new_key()
    reply = await in_process.send(
        "payment_intent.create", idempotency_key=key, user_id=user, amount=49900, product="lifetime_reports"
    )
    result = reply["result"]
    assert result["client_secret"].startswith(result["payment_intent_id"] + "_secret_")
    assert result["publishable_key"] == "pk_test_paybus_suite"
    cur = await conn.execute(
        "SELECT user_id::text, status, amount, currency, product, metadata->>'user_id'"
        " FROM payments WHERE stripe_payment_intent_id = %s",
        (result["payment_intent_id"],),
    )
    assert await cur.fetchone() == (user, "open", 49900, "inr", "lifetime_reports", user)


async def test_concurrent_first_requests_of_one_user_create_one_customer(
    in_process: InProcess, fake_stripe: FakeStripe, conn: Conn
) -> None:
    user = new_user()
    before = fake_stripe.created["customer"]
    replies = await asyncio.gather(
        *(
            in_process.send(
                "payment_intent.create",
                idempotency_key=new_key(),
                user_id=user,
                amount=5000,
                email="buyer@example.com",
                name="Asha",
            )
            for _ in range(12)
        )
    )
    assert all(r["ok"] for r in replies)
    assert fake_stripe.created["customer"] - before == 1
    cur = await conn.execute(
        "SELECT stripe_customer_id, email, name FROM stripe_customers WHERE user_id = %s", (user,)
    )
    rows = await cur.fetchall()
    assert len(rows) == 1 and rows[0][1:] == ("buyer@example.com", "Asha")
    customers = {c.params["customer"] for c in fake_stripe.calls_to("/v1/payment_intents")[-12:]}
    assert customers == {rows[0][0]}


async def test_a_changed_email_is_synced_to_the_stripe_customer(
    in_process: InProcess, fake_stripe: FakeStripe, conn: Conn
) -> None:
    user = new_user()
    await in_process.send("portal_session.create", idempotency_key=new_key(), user_id=user)
    customer = (
        await (
            await conn.execute("SELECT stripe_customer_id FROM stripe_customers WHERE user_id = %s", (user,))
        ).fetchone()
        or [None]
    )[0]
    await in_process.send(
        "payment_intent.create", idempotency_key=new_key(), user_id=user, amount=5000, email="new@example.com"
    )
    assert fake_stripe.objects[customer]["email"] == "new@example.com"
    cur = await conn.execute("SELECT email FROM stripe_customers WHERE user_id = %s", (user,))
    assert await cur.fetchone() == ("new@example.com",)


async def test_portal_session_returns_a_url_for_the_users_customer(
    in_process: InProcess, fake_stripe: FakeStripe
) -> None:
    reply = await in_process.send(
        "portal_session.create",
        idempotency_key=new_key(),
        user_id=new_user(),
        return_url="https://app.example.com/account",
    )
    assert reply["ok"] is True and reply["result"]["url"].startswith("https://billing.stripe.com/")
    call = fake_stripe.calls_to("/v1/billing_portal/sessions")[-1]
    assert call.params["return_url"] == "https://app.example.com/account"
    assert call.params["customer"].startswith("cus_")


async def insert_payment(
    conn: Conn, user: str, *, status: str = "succeeded", amount: int = 10000, refunded: int = 0
) -> tuple[str, str]:
    intent = f"pi_{new_key('x').replace('-', '')[:24]}"
    cur = await conn.execute(
        "INSERT INTO payments (user_id, stripe_payment_intent_id, amount, currency, status, amount_refunded)"
        " VALUES (%s, %s, %s, 'inr', %s, %s) RETURNING id::text",
        (user, intent, amount, status, refunded),
    )
    row = await cur.fetchone()
    assert row is not None
    return row[0], intent


async def test_refund_of_another_users_payment_is_not_found(in_process: InProcess, conn: Conn) -> None:
    payment_id, _ = await insert_payment(conn, new_user())
    reply = await in_process.send(
        "refund.create", idempotency_key=new_key(), user_id=new_user(), payment_id=payment_id
    )
    assert reply["error"]["code"] == "not_found"
    assert payment_id in reply["error"]["message"]


async def test_refund_never_exceeds_what_is_refundable(in_process: InProcess, conn: Conn) -> None:
    user = new_user()
    payment_id, _ = await insert_payment(conn, user, amount=10000, refunded=7000)
    key = new_key()
    reply = await in_process.send(
        "refund.create", idempotency_key=key, user_id=user, payment_id=payment_id, amount=3001
    )
    assert reply["error"]["code"] == "invalid_request"
    assert "exceeds the refundable 3000" in reply["error"]["message"]
    row = await request_row(conn, key)
    assert row is not None and row[2] == "failed" and row[3] == reply  # a definite answer is kept


async def test_refund_of_an_unpaid_payment_is_refused(in_process: InProcess, conn: Conn) -> None:
    user = new_user()
    _, intent = await insert_payment(conn, user, status="open")
    reply = await in_process.send(
        "refund.create", idempotency_key=new_key(), user_id=user, payment_intent_id=intent
    )
    assert reply["error"]["code"] == "invalid_request" and "is open" in reply["error"]["message"]


async def own_subscription(conn: Conn, fake: FakeStripe, user: str, product: str, price_id: str) -> str:
    sub = fake.add_subscription(customer="cus_x", price_id=price_id)
    await conn.execute(
        "INSERT INTO subscriptions (id, user_id, status, price_id, product) VALUES (%s, %s, 'active',"
        " %s, %s)",
        (sub["id"], user, price_id, product),
    )
    return str(sub["id"])


async def test_subscription_cancel_at_period_end_and_now(
    in_process: InProcess, fake_stripe: FakeStripe, conn: Conn
) -> None:
    user = new_user()
    sub = await own_subscription(conn, fake_stripe, user, "pro_monthly", "price_1PgafmB7WZ01zgkW6dKueIc5")
    later = await in_process.send(
        "subscription.cancel",
        idempotency_key=new_key(),
        user_id=user,
        subscription_id=sub,
        at_period_end=True,
    )
    assert later["result"]["status"] == "active" and later["result"]["cancel_at_period_end"] is True
    assert later["result"]["current_period_end"] > 0
    now = await in_process.send(
        "subscription.cancel",
        idempotency_key=new_key(),
        user_id=user,
        subscription_id=sub,
        at_period_end=False,
    )
    assert now["result"]["status"] == "canceled" and now["result"]["canceled_at"]


async def test_subscription_of_someone_else_is_not_found(
    in_process: InProcess, fake_stripe: FakeStripe, conn: Conn
) -> None:
    sub = await own_subscription(
        conn, fake_stripe, new_user(), "pro_monthly", "price_1PgafmB7WZ01zgkW6dKueIc5"
    )
    calls = len(fake_stripe.calls)
    reply = await in_process.send(
        "subscription.cancel", idempotency_key=new_key(), user_id=new_user(), subscription_id=sub
    )
    assert reply["error"]["code"] == "not_found"
    assert len(fake_stripe.calls) == calls


async def test_subscription_change_upgrades_with_proration_and_refuses_the_same_product(
    in_process: InProcess, fake_stripe: FakeStripe, conn: Conn
) -> None:
    user = new_user()
    sub = await own_subscription(conn, fake_stripe, user, "pro_monthly", "price_1PgafmB7WZ01zgkW6dKueIc5")
    key = new_key()
    up = await in_process.send(
        "subscription.change",
        idempotency_key=key,
        user_id=user,
        subscription_id=sub,
        product="team_monthly",
        proration_behavior="always_invoice",
    )
    assert up["ok"] is True, up
    assert (up["result"]["product"], up["result"]["price_id"]) == (
        "team_monthly",
        "price_1TeamMonthly00000000001",
    )
    call = next(c for c in fake_stripe.calls if c.key == f"paybus:{key}:change")
    assert call.params["proration_behavior"] == "always_invoice"
    assert call.params["items"][0]["price"] == "price_1TeamMonthly00000000001"
    same = await in_process.send(
        "subscription.change",
        idempotency_key=new_key(),
        user_id=user,
        subscription_id=sub,
        product="team_monthly",
    )
    assert (
        same["error"]["code"] == "invalid_request" and "already on team_monthly" in same["error"]["message"]
    )
    down = await in_process.send(
        "subscription.change",
        idempotency_key=new_key(),
        user_id=user,
        subscription_id=sub,
        product="pro_monthly",
    )
    assert down["result"]["price_id"] == "price_1PgafmB7WZ01zgkW6dKueIc5"


async def test_stripe_outage_is_a_retry_and_leaves_the_key_open(
    in_process: InProcess, fake_stripe: FakeStripe, conn: Conn
) -> None:
    user, key = new_user(), new_key()
    await in_process.send("portal_session.create", idempotency_key=new_key(), user_id=user)  # customer exists
    fake_stripe.fail_next("/v1/billing_portal/sessions", 503, 503, 503)  # the first try and both SDK retries
    body = json.dumps({"kind": "portal_session.create", "idempotency_key": key, "user_id": user}).encode()
    with pytest.raises(StripeTransient) as caught:
        await in_process.processor.process(body, "portal_session.create")
    assert caught.value.code == "stripe_unavailable"
    tries = [
        c for c in fake_stripe.calls_to("/v1/billing_portal/sessions") if c.key == f"paybus:{key}:portal"
    ]
    assert len(tries) == 3  # the SDK's own two retries (max_network_retries=2), same Idempotency-Key
    row = await request_row(conn, key)
    assert row is not None and row[2] == "pending" and row[3] is None
    reply = await in_process.processor.process(body, "portal_session.create")  # the next retry tier
    assert reply.ok is True


async def test_disabled_answers_every_request_disabled(in_process: InProcess, conn: Conn) -> None:
    processor = in_process.with_settings(requests_enabled=False)
    key = new_key()
    for body in (
        b"{",
        json.dumps(
            {"kind": "payment_intent.create", "idempotency_key": key, "user_id": new_user(), "amount": 5000}
        ).encode(),
    ):
        reply = await processor.process(body, "payment_intent.create")
        assert reply.error is not None and reply.error.code == "disabled"
    assert await request_row(conn, key) is None


async def test_a_customer_stripe_refuses_is_answered_and_the_key_stays_open(
    in_process: InProcess, fake_stripe: FakeStripe, conn: Conn
) -> None:
    user, key = new_user(), new_key()
    fake_stripe.fail_next("/v1/customers", 400)
    reply = await in_process.send("portal_session.create", idempotency_key=key, user_id=user)
    assert reply["error"]["code"] == "invalid_request"
    assert reply["error"]["message"].startswith("Stripe rejected")
    row = await request_row(conn, key)
    assert row is not None and row[2] == "pending"
    again = await in_process.send("portal_session.create", idempotency_key=key, user_id=user)
    assert again["ok"] is True
