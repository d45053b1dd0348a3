"""The ingress against a real broker: 200 only after a confirm, clear 4xx for hostile input, 503 when down."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ingress.app import create_app
from ingress.signature import sign
from shared import samples
from shared.amqp import EVENTS_QUEUE
from shared.config import Settings, load_settings
from shared.publisher import Publisher
from tests.proxy import TcpProxy
from tests.support import TEST_SECRET, drain_queue, queue_depth, signed, wait_for

TOKEN = "tok_abc123"


def _settings(amqp_url: str, **env: str) -> Settings:
    return load_settings(
        {
            "AMQP_URL": amqp_url,
            "STRIPE_WEBHOOK_SECRET": f"{TEST_SECRET},whsec_second_active_secret",
            "WEBHOOK_PATH_TOKEN": TOKEN,
            "INGRESS_MAX_BODY": "65536",
            "PUBLISH_TIMEOUT": "2",
            **env,
        }
    )


async def _client(settings: Settings) -> TestClient:  # type: ignore[type-arg]
    publisher = Publisher(settings.amqp_url, settings.publish_timeout)
    client = TestClient(TestServer(create_app(settings, publisher)))
    await client.start_server()
    assert await publisher.wait_connected(15)
    return client


@pytest.fixture
async def ingress(make_vhost: Callable[[], str]) -> AsyncIterator[tuple[TestClient, str]]:  # type: ignore[type-arg]
    amqp = make_vhost()
    client = await _client(_settings(amqp))
    yield client, amqp
    await client.close()


def _event(**overrides: object) -> dict[str, object]:
    envelope = samples.sample_event("payment_intent.succeeded")
    envelope.update(overrides)
    return envelope


async def _messages(amqp: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    return await drain_queue(amqp, EVENTS_QUEUE)


async def test_signed_event_is_published_unchanged_with_headers_before_200(ingress) -> None:  # type: ignore[no-untyped-def]
    client, amqp = ingress
    envelope = _event(account="acct_123")
    body, headers = signed(envelope)
    response = await client.post(f"/webhook/stripe/{TOKEN}", data=body, headers=headers)
    assert response.status == 200
    assert await response.json() == {"received": True, "id": envelope["id"]}
    # the confirm came before the answer, so the message is already in the queue
    [message] = await _messages(amqp)
    assert message.body == body
    assert message.type == "payment_intent.succeeded"
    assert message.routing_key == "payment_intent.succeeded"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    assert message.headers["stripe-event-id"] == envelope["id"]
    assert message.headers["stripe-account"] == "acct_123"
    assert message.headers["livemode"] is False
    assert message.headers["received-at"]


async def test_unhandled_event_types_are_accepted_too(ingress) -> None:  # type: ignore[no-untyped-def]
    client, amqp = ingress
    envelope = samples.event("plan.created", samples.fixture("plan"))
    body, headers = signed(envelope)
    response = await client.post(f"/webhook/stripe/{TOKEN}", data=body, headers=headers)
    assert response.status == 200
    assert [m.type for m in await _messages(amqp)] == ["plan.created"]


async def test_an_unroutable_publish_answers_503_and_the_publisher_keeps_working(
    make_vhost: Callable[[], str],
) -> None:
    # An exchange with no queue bound: the broker acks the publish, but returns it first (mandatory).
    # A bare ack is not "queued", so the sender must hear 503 and retry.
    amqp = make_vhost()
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange("paybus.test-unbound", aio_pika.ExchangeType.TOPIC)
    settings = _settings(amqp)
    publisher = Publisher(amqp, settings.publish_timeout, exchange="paybus.test-unbound", declare=False)
    client = TestClient(TestServer(create_app(settings, publisher)))
    await client.start_server()
    try:
        assert await publisher.wait_connected(15)
        for _ in range(2):  # the same channel answers the next publish too
            body, headers = signed(_event())
            response = await client.post(f"/webhook/stripe/{TOKEN}", data=body, headers=headers)
            assert response.status == 503
        assert (await client.get("/readyz")).status == 200
    finally:
        await client.close()


def _hostile_cases() -> list[tuple[str, Callable[[], tuple[str, bytes, dict[str, str]]], int]]:
    url = f"/webhook/stripe/{TOKEN}"

    def ok_body() -> bytes:
        return samples.encode(_event())

    def header_for(body: bytes, secret: str = TEST_SECRET, at: int | None = None) -> dict[str, str]:
        return signed(body, secret=secret, timestamp=at)[1]

    def missing_header() -> tuple[str, bytes, dict[str, str]]:
        return url, ok_body(), {"Content-Type": "application/json"}

    def garbage_header() -> tuple[str, bytes, dict[str, str]]:
        return url, ok_body(), {"Stripe-Signature": "this is not a signature"}

    def wrong_secret() -> tuple[str, bytes, dict[str, str]]:
        body = ok_body()
        return url, body, header_for(body, secret="whsec_somebody_else")

    def stale_timestamp() -> tuple[str, bytes, dict[str, str]]:
        body = ok_body()
        return url, body, header_for(body, at=int(time.time()) - 301)

    def only_v0() -> tuple[str, bytes, dict[str, str]]:
        body, now = ok_body(), int(time.time())
        return url, body, {"Stripe-Signature": f"t={now},v0={sign(body, TEST_SECRET, now)}"}

    def not_json() -> tuple[str, bytes, dict[str, str]]:
        body = b"this is not json at all"
        return url, body, header_for(body)

    def json_not_event() -> tuple[str, bytes, dict[str, str]]:
        body = json.dumps({"hello": "world", "object": "customer"}).encode()
        return url, body, header_for(body)

    def thin_event() -> tuple[str, bytes, dict[str, str]]:
        body = json.dumps(
            {
                "id": "evt_1",
                "object": "v2.core.event",
                "type": "v1.invoice.paid",
                "created": 1,
                "livemode": False,
            }
        ).encode()
        return url, body, header_for(body)

    def wrong_token() -> tuple[str, bytes, dict[str, str]]:
        body = ok_body()
        return "/webhook/stripe/tok_wrong", body, header_for(body)

    def no_token() -> tuple[str, bytes, dict[str, str]]:
        body = ok_body()
        return "/webhook/stripe", body, header_for(body)

    def too_large() -> tuple[str, bytes, dict[str, str]]:
        envelope = _event()
        envelope["padding"] = "x" * 70_000
        body = samples.encode(envelope)
        return url, body, header_for(body)

    def livemode_mismatch() -> tuple[str, bytes, dict[str, str]]:
        body = samples.encode(_event(livemode=True))
        return url, body, header_for(body)

    return [
        ("missing header", missing_header, 400),
        ("garbage header", garbage_header, 400),
        ("wrong secret", wrong_secret, 400),
        ("timestamp 301 s old", stale_timestamp, 400),
        ("only a v0 signature", only_v0, 400),
        ("signed body that is not JSON", not_json, 400),
        ("signed JSON that is not an event", json_not_event, 400),
        ("thin v2 event", thin_event, 400),
        ("wrong path token", wrong_token, 404),
        ("path without the token", no_token, 404),
        ("body over the limit", too_large, 413),
        ("livemode mismatch", livemode_mismatch, 400),
    ]


async def test_hostile_input_gets_its_status_and_nothing_is_published(ingress) -> None:  # type: ignore[no-untyped-def]
    client, amqp = ingress
    for name, build, status in _hostile_cases():
        path, body, headers = build()
        response = await client.post(path, data=body, headers=headers)
        assert response.status == status, f"{name}: got {response.status}"
        text = await response.text()
        assert TEST_SECRET not in text and "whsec_" not in text, name
    assert await queue_depth(amqp, EVENTS_QUEUE) == 0

    # the table above is not rejecting everything: rotation (two v1, only the second valid) is accepted
    body = samples.encode(_event())
    now = int(time.time())
    rotation = (
        f"t={now},v1={sign(body, 'whsec_retired', now)},v1={sign(body, 'whsec_second_active_secret', now)}"
    )
    response = await client.post(
        f"/webhook/stripe/{TOKEN}", data=body, headers={"Stripe-Signature": rotation}
    )
    assert response.status == 200
    assert await queue_depth(amqp, EVENTS_QUEUE) == 1


async def test_health_endpoints(ingress) -> None:  # type: ignore[no-untyped-def]
    client, _ = ingress
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    assert (await client.get("/webhook/stripe/anything")).status in {404, 405}


async def test_broker_down_answers_503_and_recovers_without_restart(make_vhost: Callable[[], str]) -> None:
    amqp = make_vhost()
    parts = urlsplit(amqp)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    proxied = urlunsplit(parts._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}"))
    # reconnect quickly so the test does not wait out the default 5 s
    client = await _client(_settings(proxied + "?reconnect_interval=0.2", PUBLISH_TIMEOUT="1"))
    try:
        body, headers = signed(_event())
        assert (await client.post(f"/webhook/stripe/{TOKEN}", data=body, headers=headers)).status == 200

        proxy.cut()
        down_body, down_headers = signed(_event())
        response = await client.post(f"/webhook/stripe/{TOKEN}", data=down_body, headers=down_headers)
        assert response.status == 503
        assert (await client.get("/readyz")).status == 503

        proxy.restore()

        async def accepted_again() -> bool:
            body, headers = signed(_event())
            return (await client.post(f"/webhook/stripe/{TOKEN}", data=body, headers=headers)).status == 200

        await wait_for(accepted_again, timeout=20, interval=0.2)
        assert (await client.get("/readyz")).status == 200
        # the first event and the one that finally got a 200; the 503 one was never confirmed
        ids = [m.headers["stripe-event-id"] for m in await _messages(amqp)]
        assert json.loads(body)["id"] in ids
        assert json.loads(down_body)["id"] not in ids
    finally:
        await client.close()
        await proxy.close()
