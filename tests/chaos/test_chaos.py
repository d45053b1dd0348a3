"""Chaos: ≥10,000 signed events of ≥500 users, each delivered 1-3 times in shuffled order through the
real ingress, while the processor is SIGKILLed and restarted six times, the RabbitMQ node is SIGKILLed
and restarted and Postgres is stopped without a checkpoint (`-m immediate`) and restarted — on
private instances. The end state must equal the reference model, every event id must
be in the ledger once, the dead letters must be empty, and every webhook answered 200 must be stored.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest

from shared import db, samples
from shared.amqp import DEAD_LETTER_QUEUE, EVENTS_QUEUE
from tests.chaos.instances import PrivatePostgres, PrivateRabbit
from tests.chaos.lifecycles import PaymentIntents, generate
from tests.conftest import env_for
from tests.support import Service, queue_depth, signed, wait_for

USERS = int(os.environ.get("PAYBUS_CHAOS_USERS", "640"))
MIN_EVENTS = int(os.environ.get("PAYBUS_CHAOS_MIN_EVENTS", "10000"))
SENDERS = 24
PROCESSOR_KILLS = 6


@pytest.fixture
def instances() -> Iterator[tuple[PrivatePostgres, PrivateRabbit]]:
    pg, rabbit = PrivatePostgres(), PrivateRabbit()
    try:
        pg.create()
        pg.start()
        rabbit.start()
        yield pg, rabbit
    finally:
        rabbit.destroy()
        pg.destroy()


class Sender:
    """Delivers like Stripe: signs at send time, retries until a 2xx, records what got a 200."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.accepted: set[str] = set()
        self.sent = 0
        self.retries = 0
        self.statuses: dict[int, int] = {}  # non-200 answers; Stripe retries every one of them

    async def deliver(self, session: aiohttp.ClientSession, body: bytes, event_id: str) -> None:
        while True:
            _, headers = signed(body)
            try:
                async with session.post(self.url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        self.accepted.add(event_id)
                        self.sent += 1
                        return
                    self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.retries += 1
            await asyncio.sleep(0.25)


async def test_chaos_converges_to_the_reference_model(
    instances: tuple[PrivatePostgres, PrivateRabbit], tmp_path: Path
) -> None:
    pg, rabbit = instances
    url = pg.url("paybus")
    await asyncio.to_thread(db.migrate, url)
    family = PaymentIntents()
    users = USERS
    events = generate([family], users, seed=20261126, start=int(time.time()) - 86_400)
    while len(events) < MIN_EVENTS:  # keep the seed fixed but make sure the volume is there
        users += 20
        family = PaymentIntents()
        events = generate([family], users, seed=20261126, start=int(time.time()) - 86_400)
    rng = random.Random(7)  # noqa: S311
    deliveries = [(samples.encode(e), e["id"]) for e in events for _ in range(rng.choice((1, 2, 3)))]
    rng.shuffle(deliveries)
    print(f"\nchaos: {users} users, {len(events)} events, {len(deliveries)} deliveries")

    env = env_for(
        url,
        rabbit.url,
        PAYBUS_RETRY_DELAYS_MS="200,500,1000,2000,4000",
        PROCESSOR_PREFETCH="64",
        LOG_LEVEL="WARNING",
    )
    ingress = Service("ingress", env, tmp_path / "ingress.log").start()
    processor = Service("processor", env, tmp_path / "processor.log").start()
    ingress.wait_ready(f"http://127.0.0.1:{env['INGRESS_PORT']}/readyz")
    processor.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz")
    sender = Sender(f"http://127.0.0.1:{env['INGRESS_PORT']}/webhook/stripe")
    timeline: list[str] = []
    started = time.monotonic()

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - started:6.1f}s {sender.sent:6d} sent  {what}")

    async def chaos() -> None:
        total = len(deliveries)
        plan = sorted(
            [(i / (PROCESSOR_KILLS + 1), "kill processor") for i in range(1, PROCESSOR_KILLS + 1)]
            + [(0.35, "restart rabbitmq"), (0.62, "restart postgres")]
        )
        for at, action in plan:
            while sender.sent < at * total:  # noqa: ASYNC110 - polling a progress counter
                await asyncio.sleep(0.05)
            note(action)
            if action == "kill processor":
                processor.kill()
                processor.start()
            elif action == "restart rabbitmq":
                await asyncio.to_thread(rabbit.kill)  # a crash, not a clean shutdown
                await asyncio.to_thread(rabbit.start)
            else:
                await asyncio.to_thread(pg.stop, "immediate")  # no checkpoint: crash recovery on start
                await asyncio.sleep(1)
                await asyncio.to_thread(pg.start)
            note(f"{action} done")
            await asyncio.sleep(2)  # let the system get going again before the next blow

    queue: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue()
    for item in deliveries:
        queue.put_nowait(item)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body, event_id = queue.get_nowait()
            await sender.deliver(session, body, event_id)

    try:
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=SENDERS)
        ) as session:
            chaos_task = asyncio.create_task(chaos())
            await asyncio.gather(*(worker(session) for _ in range(SENDERS)))
            await chaos_task
        note("all deliveries answered 200")

        expected_ids = {e["id"] for e in events}
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:

            async def stored() -> bool:
                row = await (await conn.execute("SELECT count(*) FROM stripe_events")).fetchone()
                return bool(row and row[0] >= len(expected_ids))

            await wait_for(stored, timeout=300, interval=1)
            note("ledger complete")
            rows = await (await conn.execute("SELECT id, outcome FROM stripe_events")).fetchall()
            ledger = [r[0] for r in rows]
            assert len(ledger) == len(set(ledger)) == len(expected_ids)  # each event id once
            assert set(ledger) == expected_ids
            assert sender.accepted <= set(ledger)  # every webhook that got a 200 is in the database
            assert {r[1] for r in rows} <= {"applied", "stale"}
            problems = await family.check(conn)
            assert not problems, f"{len(problems)} objects differ from the model, e.g. {problems[:5]}"

            async def relayed() -> bool:
                # the outbox relay came back after the broker's crash and the processor's kills too
                waiting = "SELECT count(*) FILTER (WHERE published_at IS NULL), count(*) FROM outbox"
                row = await (await conn.execute(waiting)).fetchone()
                return bool(row and row[0] == 0 and row[1] > 0)

            await wait_for(relayed, timeout=120, interval=1)
            note("outbox relayed")
        await wait_for(lambda: _empty(rabbit.url, EVENTS_QUEUE), timeout=60)
        assert await queue_depth(rabbit.url, DEAD_LETTER_QUEUE) == 0
    finally:
        note("end")
        print("\n".join(timeline))
        print(f"retried deliveries: {sender.retries}, non-200 answers by status: {sender.statuses}")
        processor.stop()
        ingress.stop()


async def _empty(url: str, queue: str) -> bool:
    return await queue_depth(url, queue) == 0
