"""The processor drain alone, for A/B work on the processor: `python -m tests.bench.drain --help`.

Publishes N mixed events into a fresh vhost, starts a real `paybus processor` per variant (each
variant gets its own database and vhost, so runs do not share state), and prints events/s and the
processor's CPU milliseconds per event. CPU per event is the steadier figure on a shared machine.

    .venv/bin/python -m tests.bench.drain --events 4000 \
        --variant PROCESSOR_BATCH=1 --variant PROCESSOR_BATCH=50

``SRC=DIR`` in a variant runs the processor code found in DIR (another checkout), for before/after;
``PROCESSORS=N`` runs N processor processes on the same queue and database. ``HANDLERS=none`` runs this
checkout's processor with an empty routing table, a ceiling: every event is consumed, recorded in the
ledger (as `ignored`) and acked, and no domain effect is applied, so the gap to a normal run is what the
domain handlers cost. ``HANDLERS=without-payment-intents`` and ``HANDLERS=payment-intents-only`` split
that cost (`tests/bench/handlers_subset.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench import ceilings, events, ingress, profiling
from tests.bench.__main__ import Bench, parse_args
from tests.bench.harness import children, cpu_seconds, loadavg, machine_busy, own_cpu
from tests.conftest import env_for
from tests.support import REPO, free_port


def broker_pid() -> int | None:
    """The RabbitMQ node's process on this machine (its CPU per event is printed beside ours)."""
    found = subprocess.run(
        ["pgrep", "-f", "beam.*-s rabbit boot"], capture_output=True, text=True, check=False
    )
    pids = [int(p) for p in found.stdout.split()]
    return min(pids) if pids else None


def postgres_pid() -> int | None:
    """The Postgres postmaster on this machine (its backends' CPU per event is printed beside ours)."""
    found = subprocess.run(["pgrep", "-o", "-x", "postgres"], capture_output=True, text=True, check=False)
    pids = [int(p) for p in found.stdout.split()]
    return pids[0] if pids else None


def tree_cpu(pid: int | None) -> dict[int, float]:
    """CPU seconds so far of each process in ``pid``'s tree (one entry per process, so that a process
    which exits during a run drops out of the sum instead of making it negative)."""
    if pid is None:
        return {}
    return {p: own_cpu(p) for p in [pid, *children(pid)]}


def processor_command(extra: dict[str, str]) -> list[str]:
    subset = extra.get("HANDLERS")
    if subset is not None:
        if "SRC" in extra:
            raise SystemExit("HANDLERS runs this checkout's processor; it does not combine with SRC")
        return ceilings.processor_with_handlers(subset)
    return ingress.command(extra, "processor")


def run_variant(
    bench: Bench, backlog: list[tuple[str, str, bytes]], extra: dict[str, str], profile: bool
) -> str:
    amqp, url = bench.vhost(), bench.database()
    asyncio.run(ceilings.publish_events(amqp, backlog))
    env = env_for(url, amqp) | {k: v for k, v in extra.items() if k not in ("SRC", "PROCESSORS", "HANDLERS")}
    broker = broker_pid()
    broker_cpu = cpu_seconds(broker) if broker else 0.0
    postgres = postgres_pid()
    postgres_cpu = tree_cpu(postgres)
    busy0, started = machine_busy(), time.monotonic()
    log_start = bench.log_size("processor")
    processor = bench.start("processor", processor_command(extra), env, cwd=REPO)
    processor.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz")
    others = []  # PROCESSORS=N: N-1 more processes on the same queue and database (scale-out)
    for n in range(1, int(extra.get("PROCESSORS", "1"))):
        other_env = env | {"METRICS_PORT": str(free_port())}
        others.append(bench.start(f"processor-{n}", processor_command(extra), other_env, cwd=REPO))
    spy = profiling.Profile(processor.pid, 15, bench.workdir / "drain.raw") if profile else None
    settled = bench.wait_applied(url, amqp, len(backlog), timeout=600)
    wall = time.monotonic() - started
    stats = bench.drain_stats(url, settled, wall)
    cpu_ms = 1000 * sum(cpu_seconds(p.pid) for p in [processor, *others]) / max(settled, 1)
    broker_ms = 1000 * (cpu_seconds(broker) - broker_cpu) / max(settled, 1) if broker else float("nan")
    postgres_ms = (
        1000 * sum(t - postgres_cpu.get(p, 0.0) for p, t in tree_cpu(postgres).items()) / max(settled, 1)
        if postgres
        else float("nan")
    )
    busy = (machine_busy() - busy0) / (os.cpu_count() or 1) / max(time.monotonic() - started, 1e-9)
    effects = bench.effects(url)
    rss = processor.rss_mib()
    if spy is not None:
        print(f"  profile: {spy.save('drain', 'paybus processor draining mixed events')}", flush=True)
    for process in [processor, *others]:
        bench.stop(process)
    log = processor.log_path.read_bytes()[log_start:].decode(errors="replace")  # this run's lines only
    acked = re.findall(r"events acked: (\d+) messages in (\d+) ack frames", log)
    acks = f"acks {int(acked[-1][0]) / max(int(acked[-1][1]), 1):.1f}/frame  " if acked else ""
    batches = re.findall(
        r"event batches: (\d+), (\d+) applied again(?: in order; (\d+) PaymentIntent)?"
        r"(?: chains applied as sets; (\d+) subscription)?(?: events applied as sets; (\d+) invoice)?"
        r"(?: events applied as sets; (\d+) customer)?",
        log,
    )
    if batches:
        acks += f"batches {int(batches[-1][0]):,} again {int(batches[-1][1]):,}  "
        if batches[-1][2]:  # older processors (SRC=) do not say
            acks += f"PI sets {int(batches[-1][2]):,}  "
        if batches[-1][3]:
            acks += f"subscription sets {int(batches[-1][3]):,}  "
        if batches[-1][4]:
            acks += f"invoice sets {int(batches[-1][4]):,}  "
        if batches[-1][5]:
            acks += f"customer sets {int(batches[-1][5]):,}  "
    label = " ".join(f"{k}={v}" for k, v in extra.items()) or "(defaults)"
    return (
        f"{label:<40} {stats['rate']:>8,.0f}/s  cpu {cpu_ms:6.3f} ms/event  "
        f"broker {broker_ms:6.3f}  postgres {postgres_ms:6.3f} ms/event  machine {busy:4.0%} busy  "
        f"rss {rss:5.1f} MiB  {acks}"
        f"settled {settled:,}/{len(backlog):,}  {effects}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.drain", description=__doc__)
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument(
        "--variant", action="append", default=[], help="NAME=VALUE[,NAME=VALUE] environment for one run"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the processor for 15 s of each run")
    args = parser.parse_args(argv)
    variants = [dict(kv.split("=", 1) for kv in v.split(",")) for v in args.variant] or [{}]
    backlog = events.mixed(args.events)
    print(f"drain A/B, {len(backlog):,} mixed events, load avg {loadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="paybus-drain-") as tmp:
        bench = Bench(parse_args(["--quick", "--skip-peer"]), Path(tmp))
        try:
            for extra in variants:
                print(run_variant(bench, backlog, extra, args.profile), flush=True)
        finally:
            bench.cleanup()
    print(f"load avg after {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
