"""Scale-out: 2 ingress + 3 processor processes on one broker and one database turn a shuffled,
duplicated stream of payment_intent lifecycles into the same final state as 1 + 1, and into the state
the ordering rule (DESIGN §9.2) predicts.

`make test` sends 1,000 events (two stacks started and fed within its time budget on two shared cores);
`make scale` sends 20,000 (PAYBUS_SCALE_EVENTS).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import psycopg
import pytest

from shared import db, samples
from tests.conftest import env_for
from tests.support import Service, database_url, queue_depth, signed, unique, wait_for

EVENTS: Final = int(os.environ.get("PAYBUS_SCALE_EVENTS", "1000"))
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(max(180, EVENTS // 10))]

# (event type, payment_intent status on the object) steps of the lifecycles Stripe produces
CREATED: Final = ("payment_intent.created", "requires_payment_method")
ACTION: Final = ("payment_intent.requires_action", "requires_action")
PROCESSING: Final = ("payment_intent.processing", "processing")
SUCCEEDED: Final = ("payment_intent.succeeded", "succeeded")
FAILED: Final = ("payment_intent.payment_failed", "requires_payment_method")
CANCELED: Final = ("payment_intent.canceled", "canceled")
LIFECYCLES: Final = (
    (CREATED, PROCESSING, SUCCEEDED),
    (CREATED, ACTION, PROCESSING, SUCCEEDED),
    (CREATED, FAILED, PROCESSING, SUCCEEDED),  # a failed attempt retried: failed is not terminal
    (CREATED, ACTION, FAILED),
    (CREATED, CANCELED),
    (CREATED, ACTION, CANCELED),
)
# The rule under test, restated independently of the processor's code (DESIGN §9.2).
STATUS: Final = {
    "payment_intent.created": "open",
    "payment_intent.requires_action": "requires_action",
    "payment_intent.processing": "processing",
    "payment_intent.payment_failed": "failed",
    "payment_intent.canceled": "canceled",
    "payment_intent.succeeded": "succeeded",
}
RANK: Final = {"open": 0, "requires_action": 1, "processing": 2, "failed": 3, "canceled": 4, "succeeded": 5}
TERMINAL: Final = {"succeeded", "canceled"}
DUPLICATE_SHARE: Final = 0.15


@dataclass
class Stream:
    deliveries: list[dict[str, Any]] = field(default_factory=list)  # send order, duplicates included
    event_ids: set[str] = field(default_factory=set)
    expected: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # intent id -> final payment row

    @property
    def intents(self) -> list[str]:
        return sorted(self.expected)


def build_stream(total: int, seed: int = 20_000) -> Stream:
    """Lifecycles until ``total`` deliveries, some steps in the same second (rank decides), then
    duplicates of a share of the events, all shuffled together."""
    rng = random.Random(seed)
    stream = Stream()
    unique_target = int(total / (1 + DUPLICATE_SHARE))
    events: list[dict[str, Any]] = []
    base = int(time.time()) - 3600
    while len(events) < unique_target:
        intent_id = f"pi_scale{uuid.UUID(int=rng.getrandbits(128)).hex[:20]}"
        user_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        amount = rng.choice((49_900, 99_900, 1_500, 250_000))
        created = base + rng.randrange(0, 1800)
        lifecycle = rng.choice(LIFECYCLES)
        keys = []
        for step, (event_type, object_status) in enumerate(lifecycle):
            if step and rng.random() < 0.7:
                created += 1  # else: the same second as the previous step
            obj = samples.payment_intent(
                intent_id=intent_id, amount=amount, user_id=user_id, status=object_status
            )
            if event_type == "payment_intent.payment_failed":
                obj["last_payment_error"] = {
                    "type": "card_error",
                    "code": "card_declined",
                    "decline_code": "do_not_honor",
                }
            event_id = f"evt_scale{uuid.UUID(int=rng.getrandbits(128)).hex[:20]}"
            events.append(samples.event(event_type, obj, created=created, event_id=event_id))
            status = STATUS[event_type]
            keys.append((status in TERMINAL, created, RANK[status], status))
        final = max(keys)[3]
        stream.expected[intent_id] = (
            intent_id,
            final,
            amount,
            "inr",
            user_id,
            "do_not_honor" if final == "failed" else None,
        )
    stream.event_ids = {e["id"] for e in events}
    duplicates = rng.sample(events, total - len(events))
    stream.deliveries = events + duplicates
    rng.shuffle(stream.deliveries)
    return stream


async def send_all(
    deliveries: Sequence[dict[str, Any]],
    urls: Callable[[], Sequence[str]],
    concurrency: int = 48,
    deadline: float = 600.0,
    counts: dict[str, int] | None = None,
) -> dict[str, int]:
    """POST every delivery like Stripe does: retry (on another ingress) until a 200; count what happened."""
    counts = counts if counts is not None else {}
    counts.update(ok=0, retried=0)
    queue: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
    for index, envelope in enumerate(deliveries):
        queue.put_nowait((index, envelope))
    give_up = time.monotonic() + deadline

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            index, envelope = queue.get_nowait()
            attempt = 0
            while True:
                targets = urls()
                body, headers = signed(envelope)
                try:
                    async with session.post(
                        targets[(index + attempt) % len(targets)], data=body, headers=headers
                    ) as r:
                        if r.status == 200:
                            counts["ok"] += 1
                            break
                        assert r.status == 503, f"unexpected {r.status}: {await r.text()}"
                except (aiohttp.ClientError, TimeoutError):
                    pass
                attempt += 1
                counts["retried"] += 1
                assert time.monotonic() < give_up, "deliveries still failing at the deadline"
                await asyncio.sleep(min(0.05 * attempt, 1.0))

    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return counts


@dataclass
class Stack:
    """`ingresses` ingress and `processors` processor processes on one vhost and one database."""

    amqp_url: str
    database: str
    logs: Path
    services: list[Service] = field(default_factory=list)
    ingress_ports: list[int] = field(default_factory=list)

    def start(self, ingresses: int, processors: int, amqp_urls: Sequence[str] | None = None) -> None:
        urls = list(amqp_urls or [self.amqp_url])
        self.logs.mkdir(parents=True, exist_ok=True)
        for n in range(processors):  # first: they declare the topology the ingress publishes into
            env = env_for(self.database, urls[n % len(urls)], PROCESSOR_PREFETCH="32")
            service = Service("processor", env, self.logs / f"processor-{n}.log").start()
            self.services.append(service)
            service.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz", timeout=30)
        for n in range(ingresses):
            env = env_for(self.database, urls[n % len(urls)])
            service = Service("ingress", env, self.logs / f"ingress-{n}.log").start()
            self.services.append(service)
            service.wait_ready(f"http://127.0.0.1:{env['INGRESS_PORT']}/readyz", timeout=30)
            self.ingress_ports.append(int(env["INGRESS_PORT"]))

    def webhook_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/webhook/stripe" for port in self.ingress_ports]

    def stop(self) -> None:
        for service in self.services:
            service.stop()


async def processed(database: str, event_ids: set[str]) -> int:
    async with await psycopg.AsyncConnection.connect(database) as conn:
        row = await (
            await conn.execute(
                "SELECT count(*) FROM stripe_events WHERE id = ANY(%s) AND outcome IS NOT NULL",
                (list(event_ids),),
            )
        ).fetchone()
    return int(row[0]) if row else 0


def final_state(database: str, stream: Stream) -> dict[str, Any]:
    with psycopg.connect(database) as conn:
        payments = conn.execute(
            "SELECT stripe_payment_intent_id, status, amount, currency, user_id::text, last_error"
            "  FROM payments WHERE stripe_payment_intent_id = ANY(%s) ORDER BY 1",
            (stream.intents,),
        ).fetchall()
        events = conn.execute(
            "SELECT count(*), count(DISTINCT id),"
            "       count(*) FILTER (WHERE outcome IS NULL OR outcome = 'failed')"
            "  FROM stripe_events WHERE id = ANY(%s)",
            (list(stream.event_ids),),
        ).fetchone()
        users = sorted({row[4] for row in payments if row[4]})
        entitlements = conn.execute(
            "SELECT user_id::text, feature, source_id, active FROM entitlements WHERE user_id::text = ANY(%s)"
            " ORDER BY 1, 2, 3",
            (users,),
        ).fetchall()
    return {"payments": payments, "events": events, "entitlements": entitlements}


async def run(stream: Stream, ingresses: int, processors: int, amqp_url: str, logs: Path) -> dict[str, Any]:
    database = database_url(unique("paybus_scale"))
    await asyncio.to_thread(db.migrate, database)
    stack = Stack(amqp_url, database, logs)
    try:
        await asyncio.to_thread(stack.start, ingresses, processors)
        started = time.monotonic()
        counts = await send_all(stream.deliveries, stack.webhook_urls)
        accepted = time.monotonic() - started
        await wait_for(
            lambda: _all_processed(database, stream), timeout=max(60.0, len(stream.deliveries) / 50)
        )
        elapsed = time.monotonic() - started
        assert await queue_depth(amqp_url, "paybus.dead-letter") == 0
        state = await asyncio.to_thread(final_state, database, stream)
        print(
            f"\n{ingresses} ingress + {processors} processor: {len(stream.deliveries)} deliveries "
            f"({len(stream.event_ids)} distinct events) accepted in {accepted:.1f}s "
            f"({len(stream.deliveries) / accepted:.0f}/s), all applied in {elapsed:.1f}s "
            f"({len(stream.deliveries) / elapsed:.0f}/s); retries {counts['retried']}"
        )
        return state
    finally:
        await asyncio.to_thread(stack.stop)
        await asyncio.to_thread(db.drop_database, database)


async def _all_processed(database: str, stream: Stream) -> bool:
    return await processed(database, stream.event_ids) == len(stream.event_ids)


@pytest.fixture(scope="module")
def stream() -> Iterator[Stream]:
    yield build_stream(EVENTS)


def test_the_stream_is_shuffled_duplicated_and_covers_every_lifecycle(stream: Stream) -> None:
    assert len(stream.deliveries) == EVENTS
    assert EVENTS - len(stream.event_ids) >= EVENTS * 0.1  # duplicates
    finals = {row[1] for row in stream.expected.values()}
    assert finals == {"succeeded", "failed", "canceled"}
    created = [d["created"] for d in stream.deliveries]
    assert created != sorted(created)


async def test_two_ingress_and_three_processors_reach_the_same_state_as_one_of_each(
    stream: Stream, make_vhost: Callable[[], str], tmp_path: Path
) -> None:
    single_run = run(stream, 1, 1, make_vhost(), tmp_path / "single")
    scaled_run = run(stream, 2, 3, make_vhost(), tmp_path / "scaled")
    if EVENTS <= 2000:  # `make test`: both stacks at once (own vhost, own database) to save wall time
        single, scaled = await asyncio.gather(single_run, scaled_run)
    else:  # `make scale` measures each stack alone
        single = await single_run
        scaled = await scaled_run
    expected = [stream.expected[intent] for intent in stream.intents]
    assert [tuple(row) for row in single["payments"]] == expected
    assert scaled == single
    distinct = len(stream.event_ids)
    assert scaled["events"] == (distinct, distinct, 0)  # each event once, none failed or pending
