"""The ingress alone, for A/B work on the ingress: `python -m tests.bench.ingress --help`.

Starts a real `paybus ingress` per variant and round (all in one vhost, whose queue is purged
after each run: creating vhosts in quick succession has hung the shared 3.10 broker), loads it
with wrk at each concurrency and prints requests/s, p50/p99 and the server's
CPU milliseconds per request (the steadier figure on a shared machine), then RSS of the process tree.
Variants alternate within each round, so background load hits them alike.

A variant is environment (``NAME=VALUE[,NAME=VALUE]``); ``SRC=DIR`` runs the paybus code found in DIR
instead of this checkout, e.g. a baseline made with ``git archive main | tar -x -C /tmp/base``:

    .venv/bin/python -m tests.bench.ingress --rounds 3 --variant SRC=/tmp/base --variant LOG_LEVEL=INFO
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aio_pika

from shared.amqp import EVENTS_QUEUE
from tests.bench import events
from tests.bench.__main__ import PAYBUS, Bench, parse_args
from tests.bench.harness import LoadResult, loadavg, run_wrk
from tests.chaos.instances import PrivateRabbit
from tests.conftest import env_for
from tests.support import TEST_SECRET

# Runs paybus from another source tree: drop the editable install's finder so DIR's packages win.
_FROM_SRC = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in repr(f)];"
    "sys.path.insert(0, sys.argv.pop(1)); from shared.cli import main; sys.exit(main())"
)


def command(extra: dict[str, str], service: str = "ingress") -> list[str]:
    """How to start ``service``: the installed paybus, or the code of the variant's ``SRC=DIR``."""
    src = extra.get("SRC")
    return [sys.executable, "-c", _FROM_SRC, src, service] if src else [PAYBUS, service]


class BenchRabbit(PrivateRabbit):
    """A private node started and stopped without rabbitmqctl (whose few CLI ports other work may hold)."""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["rabbitmq-server"],  # noqa: S607 - as tests/chaos/instances.py starts it
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        async def up() -> bool:
            with contextlib.suppress(Exception):
                await (await aio_pika.connect(self.url, timeout=2)).close()
                return True
            return False

        deadline = time.monotonic() + 120
        while not asyncio.run(up()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private rabbitmq did not start; logs in {self.base / 'log'}")
            time.sleep(0.5)

    def destroy(self) -> None:
        # `rabbitmq-server` runs the node under `su`, in a session of its own: signal the node itself
        node = None
        with contextlib.suppress(OSError, ValueError):
            node = int((self.base / "pid").read_text().strip())
        for pid in (node, self.proc.pid if self.proc is not None else None):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)  # the node shuts down cleanly on SIGTERM
        deadline = time.monotonic() + 60
        while node is not None and os.path.exists(f"/proc/{node}") and time.monotonic() < deadline:
            time.sleep(0.2)
        if node is not None and os.path.exists(f"/proc/{node}"):
            os.kill(node, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        shutil.rmtree(self.base, ignore_errors=True)


async def purge(amqp: str) -> None:
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel()
        await (await channel.get_queue(EVENTS_QUEUE)).purge()


def run_variant(
    bench: Bench, amqp: str, extra: dict[str, str], connections: list[int], seconds: int, datafile: Path
) -> tuple[dict[int, LoadResult], float]:
    env = env_for("postgresql:///unused", amqp) | {  # the ingress never opens the database
        k: v for k, v in extra.items() if k != "SRC"
    }
    ingress = bench.start("ingress", command(extra), env)
    base = f"http://127.0.0.1:{env['INGRESS_PORT']}"
    try:
        ingress.wait_ready(f"{base}/readyz")
        results = {
            c: run_wrk(f"{base}/webhook/stripe", datafile, c, seconds, server_pid=ingress.pid)
            for c in connections
        }
        return results, ingress.rss_mib()
    finally:
        bench.stop(ingress)
        asyncio.run(purge(amqp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.ingress", description=__doc__)
    parser.add_argument("--seconds", type=int, default=6, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", default="16,64", help="wrk concurrencies, comma-separated")
    parser.add_argument(
        "--private-broker",
        action="store_true",
        help="start a RabbitMQ node of its own (as `make chaos` does) instead of a vhost on the shared one",
    )
    parser.add_argument(
        "--variant", action="append", default=[], help="NAME=VALUE[,NAME=VALUE] environment for one run"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops what was started
    variants = [dict(kv.split("=", 1) for kv in v.split(",")) for v in args.variant] or [{}]
    labels = [" ".join(f"{k}={v}" for k, v in extra.items()) or "(defaults)" for extra in variants]
    connections = [int(c) for c in args.connections.split(",")]
    print(f"ingress A/B, wrk {args.seconds} s per run, load avg {loadavg()}", flush=True)
    cpu: dict[tuple[str, int], list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="paybus-ingress-") as tmp:
        bench = Bench(parse_args(["--quick", "--skip-peer"]), Path(tmp))
        datafile = Path(tmp) / "load.tsv"
        # enough unique events that no run sends one twice (wrk wraps the file otherwise)
        events.write_signed(datafile, events.succeeded(5_000 * args.seconds), TEST_SECRET)
        rabbit = BenchRabbit() if args.private_broker else None
        try:
            if rabbit is not None:
                rabbit.start()
            amqp = rabbit.url if rabbit is not None else bench.vhost()
            for round_ in range(1, args.rounds + 1):
                for label, extra in zip(labels, variants, strict=True):
                    results, rss = run_variant(bench, amqp, extra, connections, args.seconds, datafile)
                    for c, r in results.items():
                        cpu[(label, c)].append(r.cpu_ms)
                        print(
                            f"r{round_} {label:<36} c={c:<3} {r.rate:7,.0f}/s  p50 {r.p50_ms:7.2f}  "
                            f"p99 {r.p99_ms:7.2f} ms  cpu {r.cpu_ms:.3f} ms/req  errors {r.errors}",
                            flush=True,
                        )
                    print(f"r{round_} {label:<36} rss {rss:.1f} MiB  load {loadavg()}", flush=True)
        finally:
            bench.cleanup()
            if rabbit is not None:
                rabbit.destroy()
    print("median server CPU ms per request")
    for label in labels:
        cells = "  ".join(f"c={c}: {statistics.median(cpu[(label, c)]):.3f}" for c in connections)
        print(f"  {label:<36} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
