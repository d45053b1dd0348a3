"""The ingress's publisher and its link against the real broker: every confirm, every way a link ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import pytest

from shared.publisher import Publisher, PublishFailed
from tests.proxy import TcpProxy
from tests.support import drain_queue, rabbitmqctl, wait_for

EXCHANGE = "paybus.test-link"
QUEUE = "paybus.test-link.all"


async def _declare(amqp: str) -> None:
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC)
        queue = await channel.declare_queue(QUEUE, arguments={"x-queue-type": "quorum"}, durable=True)
        await queue.bind(exchange, routing_key="#")


async def _delete_exchange(amqp: str) -> None:
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(EXCHANGE)


@pytest.fixture
async def amqp(make_vhost: Callable[[], str]) -> str:
    url = make_vhost()
    await _declare(url)
    return url


@pytest.fixture
async def proxied(amqp: str) -> AsyncIterator[tuple[str, TcpProxy]]:
    parts = urlsplit(amqp)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    try:
        yield urlunsplit(parts._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}")), proxy
    finally:
        await proxy.close()


async def _publisher(url: str, timeout: float = 5) -> Publisher:
    publisher = Publisher(url, timeout, exchange=EXCHANGE, declare=False)
    await publisher.start()
    assert await publisher.wait_connected(15)
    return publisher


async def _publish(publisher: Publisher, n: int, body: bytes = b"") -> None:
    await publisher.publish(
        body or json.dumps({"n": n}).encode(),
        routing_key=f"kind.{n % 7}",
        message_type=f"kind.{n % 7}",
        headers={"stripe-event-id": f"evt_{n}", "livemode": n % 2 == 0},
    )


def _accepts(publisher: Publisher, n: int) -> Callable[[], Awaitable[bool]]:
    """A check for wait_for: publish message ``n``, true once the broker took it."""

    async def check() -> bool:
        try:
            await _publish(publisher, n)
        except PublishFailed:
            return False
        return True

    return check


async def test_every_confirmed_publish_is_in_the_queue_once_with_its_headers(amqp: str) -> None:
    publisher = await _publisher(amqp)
    try:
        await asyncio.gather(*(_publish(publisher, n) for n in range(2000)))
        # a body over the broker's frame size (128 KiB) goes as several body frames
        big = json.dumps({"n": 2000, "padding": "x" * 300_000}).encode()
        await _publish(publisher, 2000, big)
    finally:
        await publisher.close()
    messages = await drain_queue(amqp, QUEUE)
    assert len(messages) == 2001
    seen = {}
    for message in messages:
        n = json.loads(message.body)["n"]
        assert message.headers.items() >= {"stripe-event-id": f"evt_{n}", "livemode": n % 2 == 0}.items()
        assert (message.routing_key, message.type) == (f"kind.{n % 7}", f"kind.{n % 7}")
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == "application/json"
        seen[n] = message
    assert sorted(seen) == list(range(2001))
    assert seen[2000].body == big
    assert len({m.message_id for m in messages}) == 2001  # a return is matched by message id


async def test_a_channel_closed_by_the_broker_fails_the_publish_then_the_link_comes_back(amqp: str) -> None:
    publisher = await _publisher(amqp + "?reconnect_interval=0.2")
    try:
        await _publish(publisher, 1)
        await _delete_exchange(amqp)
        with pytest.raises(PublishFailed, match="404"):
            await _publish(publisher, 2)
        assert not publisher.ready
        await _declare(amqp)

        await wait_for(_accepts(publisher, 3), timeout=15, interval=0.2)
        assert publisher.ready
    finally:
        await publisher.close()
    assert sorted(json.loads(m.body)["n"] for m in await drain_queue(amqp, QUEUE)) == [1, 3]


async def test_a_silent_broker_is_found_out_by_heartbeats(proxied: tuple[str, TcpProxy], amqp: str) -> None:
    url, proxy = proxied
    publisher = await _publisher(url + "?heartbeat=1&reconnect_interval=0.2", timeout=1)
    try:
        await _publish(publisher, 1)
        proxy.freeze()
        with pytest.raises(PublishFailed):
            await _publish(publisher, 2)

        async def gone() -> bool:
            return not publisher.ready

        # three heartbeat intervals without a frame, then the link is given up
        await wait_for(gone, timeout=10, interval=0.1)
        proxy.thaw()

        await wait_for(_accepts(publisher, 3), timeout=20, interval=0.2)
    finally:
        await publisher.close()
    numbers = sorted(json.loads(m.body)["n"] for m in await drain_queue(amqp, QUEUE))
    assert 1 in numbers and 3 in numbers


async def test_a_connection_closed_by_an_operator_is_reopened(
    amqp: str,
) -> None:
    publisher = await _publisher(amqp + "?reconnect_interval=0.2")
    vhost = urlsplit(amqp).path.lstrip("/")
    try:
        await _publish(publisher, 1)
        rows = json.loads(rabbitmqctl("list_connections", "vhost", "--formatter", "json"))
        assert [row["vhost"] for row in rows].count(vhost) == 1, rows  # the link; the declaring one is closed
        rabbitmqctl("close_all_connections", "--vhost", vhost, "--limit", "10", "closed by the test")

        await wait_for(_accepts(publisher, 2), timeout=15, interval=0.2)
    finally:
        await publisher.close()
    assert sorted(json.loads(m.body)["n"] for m in await drain_queue(amqp, QUEUE)) == [1, 2]


def _memory_watermark() -> str:
    found = re.search(r"\{vm_memory_high_watermark,([0-9.]+)\}", rabbitmqctl("environment"))
    if found is None:
        pytest.skip("the broker's memory watermark is not a plain fraction, so it could not be put back")
    return found.group(1)


async def test_a_resource_alarm_fails_publishes_at_once_and_readiness_says_why(amqp: str) -> None:
    # Under a memory alarm RabbitMQ stops reading a connection once it publishes, and says so
    # (connection.blocked). That publish waits out its timeout; every later one would too, so the
    # ingress answers them 503 at once, and /readyz names the reason, until the alarm lifts.
    watermark = _memory_watermark()
    publisher = await _publisher(amqp, timeout=1)
    attempts = iter(range(100, 200))
    try:
        await _publish(publisher, 1)
        rabbitmqctl("set_vm_memory_high_watermark", "0")
        try:

            async def blocked() -> bool:
                with contextlib.suppress(PublishFailed):
                    await _publish(publisher, next(attempts))
                return publisher.unready is not None

            await wait_for(blocked, timeout=20, interval=0.05)
            assert publisher.unready is not None and "blocked" in publisher.unready
            started = time.monotonic()
            with pytest.raises(PublishFailed, match="blocked"):
                await _publish(publisher, 2)
            assert time.monotonic() - started < 0.5  # not the confirm timeout
        finally:
            rabbitmqctl("set_vm_memory_high_watermark", watermark)
        await wait_for(_accepts(publisher, 3), timeout=15, interval=0.1)
        assert publisher.unready is None
    finally:
        await publisher.close()
    numbers = {json.loads(m.body)["n"] for m in await drain_queue(amqp, QUEUE)}
    # those written before the block may land once it lifts (answered 503, retried by Stripe: a
    # duplicate the processor ignores); the one refused at once was never written
    assert {1, 3} <= numbers and 2 not in numbers


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl CLI."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_amqps_verifies_the_broker_and_publishes_over_tls(
    amqp: str, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    parts = urlsplit(amqp)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672, tls=tls).start()
    secure = urlunsplit(parts._replace(scheme="amqps", netloc=f"guest:guest@127.0.0.1:{proxy.port}"))
    try:
        # without the certificate trusted, the default verification refuses the broker
        untrusted = Publisher(secure, 2, exchange=EXCHANGE, declare=False)
        await untrusted.start()
        assert not await untrusted.wait_connected(3)
        await untrusted.close()
        publisher = await _publisher(f"{secure}?cafile={quote(str(cert))}")
        try:
            await _publish(publisher, 1)
        finally:
            await publisher.close()
    finally:
        await proxy.close()
    assert [json.loads(m.body)["n"] for m in await drain_queue(amqp, QUEUE)] == [1]
