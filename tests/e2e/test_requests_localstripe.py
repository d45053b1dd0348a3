"""PaymentIntents end to end: `paybus processor` + `paybus ingress` against localstripe started by the test.

The test plays the frontend (Stripe.js) by confirming the PaymentIntent at localstripe with a test card;
localstripe then sends its signed webhook to the real ingress, and the processor advances the payment.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
import stripe

from shared.client import CardDeclinedError, InvalidRequestError, PaymentsClient
from tests.conftest import env_for
from tests.fakes.localstripe import register_webhook, running_localstripe
from tests.support import TEST_SECRET, Service, create_vhost, delete_vhost, unique, wait_for

pytestmark = pytest.mark.e2e
Conn = psycopg.AsyncConnection[tuple[Any, ...]]
CARD_OK, CARD_DECLINED, CARD_3DS = "4242424242424242", "4000000000000341", "4000002500003155"


class System:
    def __init__(self, amqp: str, localstripe: str, processor: Service) -> None:
        self.amqp, self.localstripe, self.processor = amqp, localstripe, processor


@pytest.fixture(scope="module")
def system(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    logs = tmp_path_factory.mktemp("requests-localstripe")
    vhost = unique("paybus_requests_ls")
    amqp = create_vhost(vhost)
    with running_localstripe(logs / "localstripe.log") as localstripe:
        env = env_for(
            database,
            amqp,
            STRIPE_API_BASE=localstripe,
            STRIPE_SECRET_KEY="sk_test_paybus_e2e",
            STRIPE_PUBLISHABLE_KEY="pk_test_paybus_e2e",
        )
        ingress = Service("ingress", env, logs / "ingress.log").start()
        processor = Service("processor", env, logs / "processor.log").start()
        try:
            ingress.wait_ready(f"http://127.0.0.1:{env['INGRESS_PORT']}/readyz")
            processor.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz")
            register_webhook(
                localstripe, f"http://127.0.0.1:{env['INGRESS_PORT']}/webhook/stripe", TEST_SECRET
            )
            yield System(amqp, localstripe, processor)
        finally:
            processor.stop()
            ingress.stop()
            delete_vhost(vhost)


@pytest.fixture
async def frontend(system: System) -> AsyncIterator[stripe.StripeClient]:
    """What Stripe.js does in the browser, done against localstripe."""
    http = stripe.AIOHTTPClient()
    yield stripe.StripeClient(
        "sk_test_paybus_e2e",
        base_addresses={"api": system.localstripe},
        http_client=http,
        max_network_retries=0,
    )
    await http.close_async()  # type: ignore[no-untyped-call]


@pytest.fixture
async def payments(system: System) -> AsyncIterator[PaymentsClient]:
    async with await PaymentsClient.connect(system.amqp, reply_timeout=20) as client:
        yield client


async def card(frontend: stripe.StripeClient, number: str) -> str:
    pm = await frontend.v1.payment_methods.create_async(
        {"type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"}}
    )
    return str(pm.id)


async def payment_status(conn: Conn, intent_id: str) -> str | None:
    cur = await conn.execute("SELECT status FROM payments WHERE stripe_payment_intent_id = %s", (intent_id,))
    row = await cur.fetchone()
    return str(row[0]) if row else None


async def test_paid_with_a_test_card_the_webhook_makes_the_payment_succeeded_then_refunds_are_bounded(
    system: System, frontend: stripe.StripeClient, payments: PaymentsClient, conn: Conn
) -> None:
    user = str(uuid.uuid4())
    intent = await payments.create_payment_intent(
        idempotency_key=unique("ls-pay"),
        user_id=user,
        amount=49900,
        product="lifetime_reports",
        payment_method=await card(frontend, CARD_OK),
        email="payer@example.com",
    )
    assert (
        intent.client_secret.startswith(intent.payment_intent_id)
        and intent.publishable_key == "pk_test_paybus_e2e"
    )
    assert await payment_status(conn, intent.payment_intent_id) == "open"

    confirmed = await frontend.v1.payment_intents.confirm_async(intent.payment_intent_id)
    assert confirmed.status == "succeeded"
    await wait_for(lambda: _is(conn, intent.payment_intent_id, "succeeded"), timeout=20)
    cur = await conn.execute(
        "SELECT user_id::text, amount, product FROM payments WHERE id = %s", (intent.payment_id,)
    )
    assert await cur.fetchone() == (user, 49900, "lifetime_reports")
    cur = await conn.execute("SELECT feature FROM active_entitlements WHERE user_id = %s", (user,))
    assert await cur.fetchall() == [("reports",)]  # the catalog's feature for lifetime_reports

    partial = await payments.create_refund(
        idempotency_key=unique("ls-refund"), user_id=user, payment_id=intent.payment_id, amount=10000
    )
    assert (partial.status, partial.amount, partial.amount_refunded) == ("succeeded", 10000, 10000)
    with pytest.raises(InvalidRequestError, match="exceeds the refundable 39900"):
        await payments.create_refund(
            idempotency_key=unique("ls-refund"),
            user_id=user,
            payment_intent_id=intent.payment_intent_id,
            amount=39901,
        )
    rest = await payments.create_refund(
        idempotency_key=unique("ls-refund"), user_id=user, payment_id=intent.payment_id
    )
    assert (rest.amount, rest.amount_refunded) == (39900, 49900)
    at_stripe = (await frontend.v1.payment_intents.retrieve_async(intent.payment_intent_id)).to_dict()
    assert at_stripe["latest_charge"]["amount_refunded"] == 49900  # Stripe agrees (expanded by localstripe)
    cur = await conn.execute("SELECT amount_refunded FROM payments WHERE id = %s", (intent.payment_id,))
    assert await cur.fetchone() == (49900,)
    # a full refund revokes what the payment granted, and says so on paybus.events
    cur = await conn.execute("SELECT count(*) FROM active_entitlements WHERE user_id = %s", (user,))
    assert await cur.fetchone() == (0,)
    cur = await conn.execute(
        "SELECT event_type FROM outbox WHERE user_id = %s AND event_type IN"
        " ('payment.refunded', 'entitlement.revoked') ORDER BY seq",
        (user,),
    )
    assert [r[0] for r in await cur.fetchall()] == [
        "payment.refunded",
        "payment.refunded",
        "entitlement.revoked",
    ]


async def test_a_declined_card_makes_the_payment_failed(
    system: System, frontend: stripe.StripeClient, payments: PaymentsClient, conn: Conn
) -> None:
    user = str(uuid.uuid4())
    intent = await payments.create_payment_intent(
        idempotency_key=unique("ls-decline"),
        user_id=user,
        amount=5000,
        payment_method=await card(frontend, CARD_DECLINED),
    )
    with pytest.raises(stripe.CardError):
        await frontend.v1.payment_intents.confirm_async(intent.payment_intent_id)
    await wait_for(lambda: _is(conn, intent.payment_intent_id, "failed"), timeout=20)
    # Confirmed at once by the request itself, the decline is the reply.
    with pytest.raises(CardDeclinedError) as declined:
        await payments.create_payment_intent(
            idempotency_key=unique("ls-decline"),
            user_id=user,
            amount=5000,
            confirm=True,
            payment_method=await card(frontend, CARD_DECLINED),
        )
    assert declined.value.retryable is False and declined.value.decline_code


async def test_a_3d_secure_card_requires_action_and_the_reply_says_what_the_frontend_needs(
    system: System, frontend: stripe.StripeClient, payments: PaymentsClient, conn: Conn
) -> None:
    intent = await payments.create_payment_intent(
        idempotency_key=unique("ls-3ds"),
        user_id=str(uuid.uuid4()),
        amount=5000,
        confirm=True,
        payment_method=await card(frontend, CARD_3DS),
    )
    assert intent.status == "requires_action"
    assert intent.next_action is not None and intent.next_action.type == "use_stripe_sdk"
    assert (
        intent.client_secret and intent.publishable_key == "pk_test_paybus_e2e"
    )  # for stripe.handleNextAction
    assert await payment_status(conn, intent.payment_intent_id) == "requires_action"


async def _is(conn: Conn, intent_id: str, status: str) -> bool:
    return await payment_status(conn, intent_id) == status
