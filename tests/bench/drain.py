"""The processor drain alone, for A/B work on the processor: `python -m tests.bench.drain --help`.

Publishes N mixed events into a fresh vhost, starts a real `paybus processor` per variant (each
variant gets its own database and vhost, so runs do not share state), and prints events/s and the
processor's CPU milliseconds per event. CPU per event is the steadier figure on a shared machine.

    .venv/bin/python -m tests.bench.drain --events 4000 \
        --variant PROCESSOR_BATCH=1 --variant PROCESSOR_BATCH=50
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench import ceilings, events, profiling
from tests.bench.__main__ import PAYBUS, Bench, parse_args
from tests.bench.harness import cpu_seconds, loadavg
from tests.conftest import env_for


def broker_pid() -> int | None:
    """The RabbitMQ node's process on this machine (its CPU per event is printed beside ours)."""
    found = subprocess.run(
        ["pgrep", "-f", "beam.*-s rabbit boot"], capture_output=True, text=True, check=False
    )
    pids = [int(p) for p in found.stdout.split()]
    return min(pids) if pids else None


def run_variant(
    bench: Bench, backlog: list[tuple[str, str, bytes]], extra: dict[str, str], profile: bool
) -> str:
    amqp, url = bench.vhost(), bench.database()
    asyncio.run(ceilings.publish_events(amqp, backlog))
    env = env_for(url, amqp) | extra
    broker = broker_pid()
    broker_cpu = cpu_seconds(broker) if broker else 0.0
    started = time.monotonic()
    processor = bench.start("processor", [PAYBUS, "processor"], env)
    processor.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz")
    spy = profiling.Profile(processor.pid, 15, bench.workdir / "drain.raw") if profile else None
    settled = bench.wait_applied(url, amqp, len(backlog), timeout=600)
    wall = time.monotonic() - started
    stats = bench.drain_stats(url, settled, wall)
    cpu_ms = 1000 * cpu_seconds(processor.pid) / max(settled, 1)
    broker_ms = 1000 * (cpu_seconds(broker) - broker_cpu) / max(settled, 1) if broker else float("nan")
    effects = bench.effects(url)
    rss = processor.rss_mib()
    if spy is not None:
        print(f"  profile: {spy.save('drain', 'paybus processor draining mixed events')}", flush=True)
    bench.stop(processor)
    label = " ".join(f"{k}={v}" for k, v in extra.items()) or "(defaults)"
    return (
        f"{label:<40} {stats['rate']:>8,.0f}/s  cpu {cpu_ms:6.3f} ms/event  "
        f"broker cpu {broker_ms:6.3f} ms/event  rss {rss:5.1f} MiB  "
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
