"""Real processes: /metrics parses and counters move; logs never carry secrets, signatures, emails, cards."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from ingress.signature import sign
from shared import samples
from tests.e2e.conftest import Stack
from tests.e2e.test_pipeline import _post
from tests.support import TEST_SECRET, wait_for


def _scrape(port: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def _raw_post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_metrics_count_accepted_rejected_and_duplicate_webhooks(
    stack_factory: Callable[..., Stack], make_vhost: Callable[[], str], conn: psycopg.AsyncConnection[Any]
) -> None:
    stack = stack_factory(make_vhost())
    stack.start_ingress()
    stack.start_processor()
    envelope = samples.sample_event("payment_intent.succeeded")
    assert [_post(stack.webhook_url, envelope) for _ in range(3)] == [200, 200, 200]
    body = samples.encode(samples.sample_event("payment_intent.created"))
    assert _raw_post(stack.webhook_url, body, {"Stripe-Signature": "t=1,v1=00"}) == 400
    stale = int(time.time()) - 1000
    assert (
        _raw_post(
            stack.webhook_url, body, {"Stripe-Signature": f"t={stale},v1={sign(body, TEST_SECRET, stale)}"}
        )
        == 400
    )

    ingress = _scrape(stack.env["INGRESS_PORT"])
    assert ingress[("paybus_webhooks_total", (("outcome", "accepted"),))] == 3
    assert ingress[("paybus_webhooks_total", (("outcome", "bad_signature"),))] == 1
    assert ingress[("paybus_webhooks_total", (("outcome", "stale"),))] == 1
    assert ingress[("paybus_publish_seconds_count", ())] == 3

    key_applied = (
        "paybus_events_processed_total",
        (("outcome", "applied"), ("type", "payment_intent.succeeded")),
    )
    key_duplicate = (
        "paybus_events_processed_total",
        (("outcome", "duplicate"), ("type", "payment_intent.succeeded")),
    )

    async def processed() -> dict[Any, float] | None:
        values = _scrape(stack.env["METRICS_PORT"])
        return values if values.get(key_applied, 0) + values.get(key_duplicate, 0) == 3 else None

    processor = await wait_for(processed)
    assert processor[key_applied] == 1
    assert processor[key_duplicate] == 2
    assert processor[("paybus_event_lag_seconds_count", ())] == 1
    assert processor[("paybus_database_up", ())] == 1


SECRET_PATTERNS = {
    "webhook secret": re.compile(re.escape(TEST_SECRET)),
    "whsec": re.compile(r"whsec_[A-Za-z0-9_]{4,}"),
    "signature hex": re.compile(r"[0-9a-f]{64}"),
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    "card number": re.compile(r"\b4242 ?4242 ?4242 ?4242\b|\b4000\d{12}\b"),
    "client secret": re.compile(r"_secret_[A-Za-z0-9]{6,}"),
}


async def test_logs_carry_no_secret_signature_email_or_card_data(
    stack_factory: Callable[..., Stack], make_vhost: Callable[[], str], conn: psycopg.AsyncConnection[Any]
) -> None:
    stack = stack_factory(make_vhost(), LOG_LEVEL="DEBUG", WEBHOOK_PATH_TOKEN="log-scan-token")
    stack.start_ingress()
    stack.start_processor()
    from tests.integration.test_ingress import _hostile_cases

    # the hostile-input table, aimed at the real process
    for _name, build, _status in _hostile_cases():
        path, body, headers = build()
        path = path.replace("tok_abc123", "log-scan-token")
        _raw_post(f"http://127.0.0.1:{stack.env['INGRESS_PORT']}{path}", body, headers)

    # a full lifecycle whose payloads are full of personal and card data
    user = "7d3f7c8e-5555-4a5b-9c9d-000000000005"
    intent = samples.payment_intent(user_id=user)
    intent["receipt_email"] = "jenny.rosen@example.com"
    intent["shipping"] = {"name": "Jenny Rosen", "phone": "+91 98765 43210"}
    ids = []
    for step in ("created", "requires_action", "processing", "payment_failed", "succeeded"):
        envelope = samples.event(f"payment_intent.{step}", dict(intent))
        envelope["data"]["object"]["description"] = "card 4242 4242 4242 4242 for jenny.rosen@example.com"
        ids.append(envelope["id"])
        assert _post(stack.webhook_url, envelope) == 200
    poison_body = json.dumps({"id": "evt_poison", "email": "jenny.rosen@example.com"}).encode()
    import aio_pika

    connection = await aio_pika.connect(stack.env["AMQP_URL"])
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("stripe.events")
        await exchange.publish(aio_pika.Message(poison_body), routing_key="payment_intent.succeeded")

    async def all_done() -> bool:
        row = await (
            await conn.execute(
                "SELECT count(*) FROM stripe_events WHERE id = ANY(%s) AND outcome IS NOT NULL", (ids,)
            )
        ).fetchone()
        return bool(row and row[0] == len(ids))

    await wait_for(all_done)
    await wait_for(lambda: _logged(stack, "dead-lettering"))
    row = await (await conn.execute("SELECT setting FROM pg_settings WHERE name = 'autovacuum'")).fetchone()
    if row and row[0] == "off":  # this machine class's Postgres: the processor says so once, at start
        await wait_for(lambda: _logged(stack, "Postgres has autovacuum off"))
    stack.stop()

    logs = stack.ingress.log() + stack.processor.log()
    assert "webhook accepted" in logs and "webhook rejected" in logs  # the scan is looking at real output
    assert ("Postgres has autovacuum" in logs) == (row is not None and row[0] == "off"), row
    for line in logs.splitlines():
        for what, pattern in SECRET_PATTERNS.items():
            assert not pattern.search(line), f"{what} in log line: {line[:300]}"
        if line.startswith("{"):
            json.loads(line)  # structured


async def _logged(stack: Stack, text: str) -> bool:
    return text in stack.processor.log()


async def test_an_unreachable_trace_collector_neither_fails_nor_slows_webhooks(
    stack_factory: Callable[..., Stack], make_vhost: Callable[[], str]
) -> None:
    # A collector that accepts connections and never answers: an exporter on the request path would hang
    # each request for its 10 s export timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        stack = stack_factory(
            make_vhost(), OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_BSP_SCHEDULE_DELAY="100"
        )
        stack.start_ingress()
        timings = []
        for _ in range(20):
            started = time.perf_counter()
            assert _post(stack.webhook_url, samples.sample_event("payment_intent.created")) == 200
            timings.append(time.perf_counter() - started)
        assert max(timings) < 5.0, timings
        assert stack.ingress.proc is not None and stack.ingress.proc.poll() is None
