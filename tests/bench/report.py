"""The bench's table: paybus beside the peer and the ceilings, every ratio, and the targets PASS/FAIL."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.bench.harness import LoadResult

# Targets of the performance issue; ratios, because absolute figures on a shared 2-core box are noise.
INGRESS_RATE_VS_PEER = 1.5
DRAIN_VS_PEER = 1.0
INGRESS_RSS_MIB = 80
PROCESSOR_RSS_MIB = 150


@dataclass
class Results:
    quick: bool
    drain_events: int
    e2e_rate: int
    load_before: str = ""
    load_after: str = ""
    bare: LoadResult | None = None
    ingress: dict[int, LoadResult] = field(default_factory=dict)
    peer: dict[int, LoadResult] = field(default_factory=dict)
    peer_rows: int = 0
    publish_rate: float = 0.0
    insert_rate: float = 0.0
    drain: dict[str, Any] = field(default_factory=dict)
    drain_per_core: dict[str, Any] = field(default_factory=dict)
    ledger_only: dict[str, Any] = field(default_factory=dict)
    e2e: dict[str, Any] = field(default_factory=dict)
    e2e_load: dict[str, Any] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)
    effects: dict[str, Any] = field(default_factory=dict)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def render(r: Results) -> str:
    lines: list[str] = []
    add = lines.append
    add(
        f"paybus bench {'(--quick: smoke figures only) ' if r.quick else ''}"
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {_cpu()}, {os.cpu_count()} cores, "
        f"load avg before {r.load_before} / after {r.load_after}"
    )
    add("")
    add(f"{'ingress acceptance (payment_intent.succeeded)':<48}{'paybus':>22}{'peer':>22}{'paybus/peer':>13}")
    for c in (16, 64):
        ours, theirs = r.ingress.get(c), r.peer.get(c)
        if ours is None:
            continue
        add(
            f"  c={c:<3} requests/s{'':<33}{ours.rate:>22,.0f}{(theirs.rate if theirs else 0):>22,.0f}"
            f"{_ratio(ours.rate, theirs.rate) if theirs else 'n/a':>13}"
        )
        add(
            f"  c={c:<3} p50 / p99 ms{'':<31}{f'{ours.p50_ms:.2f} / {ours.p99_ms:.2f}':>22}"
            f"{(f'{theirs.p50_ms:.2f} / {theirs.p99_ms:.2f}' if theirs else '-'):>22}"
            f"{_ratio(ours.p99_ms, theirs.p99_ms) if theirs else 'n/a':>13}"
        )
        add(f"  c={c:<3} errors{'':<37}{ours.errors:>22}{(theirs.errors if theirs else '-'):>22}")
        if ours.wal_rolled is not None:
            rolled = "yes" if ours.wal_rolled else "no"
            add(f"  c={c:<3} RabbitMQ quorum WAL rolled over in the run{'':<1}{rolled:>22}{'-':>22}")
        add(
            f"  c={c:<3} server CPU ms per request{'':<18}{ours.cpu_ms:>22.3f}"
            f"{(theirs.cpu_ms if theirs else 0):>22.3f}"
            f"{_ratio(ours.cpu_ms, theirs.cpu_ms) if theirs else 'n/a':>13}"
        )
        add(
            f"  c={c:<3} machine CPU ms per request (all){'':<11}{ours.machine_ms:>22.3f}"
            f"{(theirs.machine_ms if theirs else 0):>22.3f}"
            f"{_ratio(ours.machine_ms, theirs.machine_ms) if theirs else 'n/a':>13}"
        )
    add("")
    peer_best = max((p.rate for p in r.peer.values()), default=0.0)
    drain_rate = float(r.drain.get("rate", 0.0))
    add(f"{'processor drain':<48}{'paybus':>22}{'peer':>22}{'paybus/peer':>13}")
    add(
        f"  {r.drain_events:,} mixed events queued, events/s{'':<8}{drain_rate:>22,.0f}{peer_best:>22,.0f}"
        f"{_ratio(drain_rate, peer_best):>13}"
    )
    span = f"{r.drain.get('seconds', 0):.1f} / {r.drain.get('wall', 0):.1f}"
    add(f"  first to last apply / from process start, s{'':<3}{span:>22}")
    settled = r.drain.get("settled", 0)
    add(f"  events settled / queued{'':<24}{f'{settled:,} / {r.drain_events:,}':>22}")
    add(f"  processor CPU ms per event (whole life){'':<8}{r.drain.get('cpu_ms', 0):>22.3f}")
    peer_machine = min((p.machine_ms for p in r.peer.values()), default=0.0)
    add(
        f"  machine CPU ms per event (all processes){'':<7}{r.drain.get('machine_ms', 0):>22.3f}"
        f"{peer_machine:>22.3f}{_ratio(r.drain.get('machine_ms', 0), peer_machine):>13}"
    )
    per_core = r.drain_per_core
    per_core_rate = float(per_core.get("rate", 0.0))
    if per_core:
        label = f"  {per_core.get('processors', 0)} processors, one per core: events/s"
        add(f"{label:<48}{per_core_rate:>22,.0f}{peer_best:>22,.0f}{_ratio(per_core_rate, peer_best):>13}")
        machine = float(per_core.get("machine_ms", 0))
        ratio = _ratio(machine, peer_machine)
        add(f"{'    machine CPU ms per event':<48}{machine:>22.3f}{peer_machine:>22.3f}{ratio:>13}")
        add(f"{'    events settled':<48}{per_core.get('settled', 0):>22,}")
    add("  (peer: its best webhooks/s above; it verifies and writes each webhook inline)")
    add("")
    add(
        f"end to end at {r.e2e_rate:,}/s offered for {r.e2e_load.get('sent', 0):,} events "
        f"(achieved {r.e2e_load.get('offered_rate', 0):,.0f}/s, HTTP errors {r.e2e_load.get('errors', '?')}, "
        f"unsent {r.e2e_load.get('unsent', 0):,})"
    )
    lag = f"{r.e2e.get('p50_ms', 0):.1f} / {r.e2e.get('p99_ms', 0):.1f} / {r.e2e.get('max_ms', 0):.1f}"
    add(f"  lag received_at -> processed_at, p50 / p99 / max ms   {lag}")
    http = f"{r.e2e_load.get('p50_ms', 0):.2f} / {r.e2e_load.get('p99_ms', 0):.2f}"
    add(f"  HTTP p50 / p99 ms{'':<31}{http:>22}")
    add(f"  events in the lag figures{'':<22}{r.e2e.get('count', 0):>22,}")
    add("")
    add("memory after the run (VmRSS, MiB)")
    for name, mib in r.rss.items():
        add(f"  {name:<46}{mib:>22.1f}")
    add("")
    add("ceilings (same run)")
    ingress64 = r.ingress.get(64)
    if r.bare:
        add(
            f"  bare aiohttp POST, c=64, requests/s{'':<11}{r.bare.rate:>22,.0f}"
            f"{'ingress/bare':>22}{_ratio(ingress64.rate if ingress64 else 0, r.bare.rate):>13}"
        )
    add(
        f"  confirmed publish, 64 in flight, msgs/s{'':<7}{r.publish_rate:>22,.0f}"
        f"{'ingress/publish':>22}{_ratio(ingress64.rate if ingress64 else 0, r.publish_rate):>13}"
    )
    add(
        f"  batched inserts (500/tx), rows/s{'':<14}{r.insert_rate:>22,.0f}"
        f"{'drain/inserts':>22}{_ratio(drain_rate, r.insert_rate):>13}"
    )
    if r.ledger_only:
        ledger_rate = float(r.ledger_only.get("rate", 0.0))
        add(
            f"  processor, no domain handlers, events/s{'':<7}{ledger_rate:>22,.0f}"
            f"{'drain/ledger only':>22}{_ratio(drain_rate, ledger_rate):>13}"
        )
        add(f"{'    its processor CPU ms per event':<48}{r.ledger_only.get('cpu_ms', 0):>22.3f}")
    add("")
    add("effects in the drain+e2e database: " + ", ".join(f"{k} {v:,}" for k, v in r.effects.items()))
    add("")
    add("targets")
    if r.peer:
        best = max(r.ingress.values(), key=lambda x: x.rate) if r.ingress else None
        peer_p99 = min(p.p99_ms for p in r.peer.values())
        if best:
            ok = best.rate >= INGRESS_RATE_VS_PEER * peer_best and all(
                r.ingress[c].p99_ms <= r.peer[c].p99_ms for c in r.ingress if c in r.peer
            )
            add(
                f"  {_verdict(ok)}  ingress >= {INGRESS_RATE_VS_PEER}x peer webhooks/s "
                f"({best.rate:,.0f} vs {peer_best:,.0f} = {_ratio(best.rate, peer_best)}) "
                f"and p99 <= peer's at each concurrency (peer's best p99 {peer_p99:.2f} ms)"
            )
        best_drain = max(drain_rate, per_core_rate)
        add(
            f"  {_verdict(best_drain >= DRAIN_VS_PEER * peer_best)}  "
            f"processor drain >= {DRAIN_VS_PEER}x peer, best of 1 and one per core "
            f"({best_drain:,.0f} vs {peer_best:,.0f} = {_ratio(best_drain, peer_best)})"
        )
    ingress_rss = max((v for k, v in r.rss.items() if k.startswith("ingress")), default=0.0)
    add(
        f"  {_verdict(0 < ingress_rss <= INGRESS_RSS_MIB)}  "
        f"ingress RSS <= {INGRESS_RSS_MIB} MiB ({ingress_rss:.1f})"
    )
    processor_rss = r.rss.get("processor", 0.0)
    add(
        f"  {_verdict(0 < processor_rss <= PROCESSOR_RSS_MIB)}  processor RSS <= {PROCESSOR_RSS_MIB} MiB "
        f"({processor_rss:.1f})"
    )
    return "\n".join(lines)
