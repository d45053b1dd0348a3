"""The bench's own pieces, no sockets: its events are real signed Stripe events; its table judges right."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

from ingress.signature import verify
from processor.chains import split
from processor.events import decode_event
from shared.envelope import decode_envelope
from tests.bench import events
from tests.bench.harness import LoadResult
from tests.bench.profiling import summarise
from tests.bench.report import Results, render
from tests.support import TEST_SECRET


def test_bench_events_are_unique_signed_stripe_events(tmp_path: Path) -> None:
    path = tmp_path / "load.tsv"
    assert events.write_signed(path, events.succeeded(50), TEST_SECRET) == 50
    ids, intents = set(), set()
    for line in path.read_bytes().splitlines():
        header, body = line.split(b"\t", 1)
        verify(body, header.decode(), [TEST_SECRET], now=time.time())
        env = decode_envelope(body)
        obj = json.loads(body)["data"]["object"]
        assert env.type == "payment_intent.succeeded" and obj["status"] == "succeeded"
        assert obj["metadata"]["product"] == events.PRODUCT
        ids.add(env.id)
        intents.add(obj["id"])
    assert len(ids) == len(intents) == 50


def test_drain_mix_keeps_a_journey_on_one_object_and_user() -> None:
    mix = events.mixed(len(events.JOURNEY[0]) + 1)
    created, charge, succeeded = (json.loads(body) for _, _, body in mix[:3])
    assert [created["type"], charge["type"], succeeded["type"]] == list(events.JOURNEY[0])
    assert created["data"]["object"]["id"] == succeeded["data"]["object"]["id"]
    assert charge["data"]["object"]["payment_intent"] == created["data"]["object"]["id"]  # as Stripe sends it
    assert charge["data"]["object"]["id"].startswith("ch_")
    assert created["data"]["object"]["metadata"] == succeeded["data"]["object"]["metadata"]
    assert charge["data"]["object"]["metadata"]["user_id"] == created["data"]["object"]["metadata"]["user_id"]
    assert created["created"] < charge["created"] < succeeded["created"]
    assert len({event_id for event_id, _, _ in events.mixed(300)}) == 300


def test_drain_mix_journeys_share_no_object() -> None:
    """Two cycles of the mix split into one chain per journey: no fixture id ties journeys together (a
    subscription's items naming the fixture's subscription once put every subscription in one chain)."""
    cycle = sum(len(journey) for journey in events.JOURNEY)
    mix = events.mixed(2 * cycle)
    chains = split([decode_event(body) for _, _, body in mix])
    assert len(chains) == 2 * len(events.JOURNEY)


def test_profile_summary_ranks_self_and_total_time(tmp_path: Path) -> None:
    raw = tmp_path / "p.raw"
    raw.write_text(
        "main (app.py:1);handle (app.py:5);send (x/site-packages/lib/io.py:9) 30\n"
        "main (app.py:1);handle (app.py:5) 10\n"
    )
    text = summarise(raw, "t")
    assert "40 on-CPU samples" in text
    self_part, total_part = text.split("## total")
    assert self_part.index("75.0%  send (lib/io.py)") < self_part.index("25.0%  handle (app.py)")
    assert "100.0%  handle (app.py)" in total_part


def test_table_marks_each_target() -> None:
    def load(rate: float, p99: float) -> LoadResult:
        return LoadResult(requests=int(rate * 10), seconds=10, errors=0, p50_ms=p99 / 2, p99_ms=p99)

    results = Results(quick=False, drain_events=1000, e2e_rate=1000)
    results.ingress = {16: load(3000, 5), 64: load(4000, 9)}
    results.peer = {16: load(1000, 10), 64: load(2000, 12)}
    results.drain = {"rate": 1500.0, "seconds": 1.0, "wall": 2.0, "settled": 1000}
    results.rss = {"ingress": 60.0, "processor": 200.0}
    table = render(results)
    assert "PASS  ingress >= 1.5x peer webhooks/s (4,000 vs 2,000 = 2.00x)" in table
    assert "FAIL  processor drain >= 1.0x peer, best of 1 and one per core (1,500 vs 2,000 = 0.75x)" in table
    assert "PASS  ingress RSS <= 80 MiB (60.0)" in table
    assert "FAIL  processor RSS <= 150 MiB (200.0)" in table
    assert "WAL rolled" not in table  # not known: no line

    results.ingress = {
        16: dataclasses.replace(results.ingress[16], wal_rolled=False),
        64: dataclasses.replace(results.ingress[64], wal_rolled=True),
    }
    table = render(results)
    assert re.search(r"c=64\s+RabbitMQ quorum WAL rolled over in the run\s+yes", table)
    assert re.search(r"c=16\s+RabbitMQ quorum WAL rolled over in the run\s+no", table)

    results.drain_per_core = {"rate": 2100.0, "seconds": 1.0, "settled": 1000, "processors": 2}
    table = render(results)
    assert "2 processors, one per core: events/s" in table
    assert "PASS  processor drain >= 1.0x peer, best of 1 and one per core (2,100 vs 2,000 = 1.05x)" in table


def test_the_drain_mix_names_no_fixture_reference_twice() -> None:
    """Every session names its own PaymentIntent and every subscription or invoice its own customer,
    as in a real shop's stream (one shared fixture id would pile every event onto one row)."""
    seen: dict[str, set[str]] = {"payment_intent": set(), "customer": set()}
    for _, event_type, body in events.mixed(2 * len(events.JOURNEY) * 3):
        obj = json.loads(body)["data"]["object"]
        for field, values in seen.items():
            value = obj.get(field)
            if isinstance(value, str) and not event_type.startswith("payment_intent."):
                assert value not in values, f"{event_type} repeats {field} {value}"
                values.add(value)
    assert seen["payment_intent"] and seen["customer"]
