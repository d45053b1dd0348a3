"""`make bench`: paybus and the peer measured side by side in one run; prints the table and the targets.

Everything runs on loopback in databases and vhosts of its own, bounded in count and time, and is
removed at the end. `--quick` shrinks every phase for a smoke run; `--profile` adds py-spy runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import psycopg

from shared import db
from shared.amqp import EVENTS_QUEUE
from tests.bench import ceilings, events, profiling
from tests.bench.harness import (
    PEER_DIR,
    BenchError,
    LoadResult,
    Process,
    cpu_seconds,
    loadavg,
    machine_busy,
    quorum_wal_files,
    require_peer,
    require_wrk,
    run_wrk,
)
from tests.bench.report import Results, render
from tests.conftest import env_for
from tests.support import REPO, TEST_SECRET, create_vhost, database_url, delete_vhost, free_port, unique

PAYBUS = str(Path(sys.executable).parent / "paybus")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small and short: a smoke run, not figures")
    parser.add_argument(
        "--events", type=int, help="events in the processor drain (default 50000; quick 5000)"
    )
    parser.add_argument("--seconds", type=int, help="length of each wrk run (default 10; quick 4)")
    parser.add_argument("--rate", type=int, default=1000, help="offered rate of the end-to-end run (/s)")
    parser.add_argument("--e2e-seconds", type=int, help="length of the end-to-end run (default 30; quick 8)")
    parser.add_argument("--profile", action="store_true", help="also record py-spy profiles (extra runs)")
    parser.add_argument("--skip-peer", action="store_true", help="measure paybus only (no ratios)")
    args = parser.parse_args(argv)
    args.events = args.events or (5_000 if args.quick else 50_000)
    args.seconds = args.seconds or (4 if args.quick else 10)
    args.e2e_seconds = args.e2e_seconds or (8 if args.quick else 30)
    return args


class Bench:
    """One run: owns every process, database and vhost it makes, and removes them all at the end."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.results = Results(quick=args.quick, drain_events=args.events, e2e_rate=args.rate)
        self._processes: list[Process] = []
        self._vhosts: list[str] = []
        self._databases: list[str] = []

    # ---- resources -------------------------------------------------------------------------------
    def vhost(self) -> str:
        name = unique("paybus_bench")
        self._vhosts.append(name)
        return create_vhost(name)

    def database(self, migrate: bool = True) -> str:
        url = database_url(unique("paybus_bench"))
        self._databases.append(url)
        if migrate:
            db.migrate(url)
        else:
            db.ensure_database(url)
        return url

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> Process:
        process = Process(name, argv, env, self.workdir / f"{name}.log", cwd)
        self._processes.append(process)
        return process

    def log_size(self, name: str) -> int:
        """How much the log of process ``name`` holds already (`start` appends to it)."""
        path = self.workdir / f"{name}.log"
        return path.stat().st_size if path.exists() else 0

    def stop(self, process: Process) -> None:
        process.stop()
        self._processes.remove(process)

    def cleanup(self) -> None:
        for process in reversed(self._processes):
            with contextlib.suppress(Exception):
                process.stop()
        for name in self._vhosts:
            delete_vhost(name)
        for url in self._databases:
            with contextlib.suppress(Exception):
                db.drop_database(url)

    def signed_file(self, name: str, bodies: Iterator[bytes] | list[bytes]) -> Path:
        path = self.workdir / f"{name}.tsv"
        events.write_signed(path, bodies, TEST_SECRET)
        return path

    def pool_size(self) -> int:
        # enough unique events that a run at up to 8,000/s never sends one twice
        return 8_000 * int(self.args.seconds)

    # ---- phases ----------------------------------------------------------------------------------
    def run_load(self, url: str, connections: int, name: str, pid: int) -> LoadResult:
        datafile = self.signed_file(name, events.succeeded(self.pool_size()))
        wal_before = quorum_wal_files()
        result = run_wrk(url, datafile, connections, self.args.seconds, server_pid=pid)
        wal_after = quorum_wal_files()
        if wal_before is not None and wal_after is not None:
            result = dataclasses.replace(result, wal_rolled=wal_before != wal_after)
        datafile.unlink()
        print(
            f"  {name}: {result.rate:,.0f}/s p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms "
            f"errors {result.errors}, server CPU {result.cpu_ms:.2f} ms/request"
            + (f" (file wrapped {result.wrapped}x)" if result.wrapped else ""),
            flush=True,
        )
        return result

    def bare_ceiling(self) -> None:
        port = free_port()
        bare = self.start("bare", [sys.executable, "-m", "tests.bench.bare", str(port)], {}, cwd=REPO)
        bare.wait_ready(f"http://127.0.0.1:{port}/healthz")
        self.results.bare = self.run_load(f"http://127.0.0.1:{port}/webhook/stripe", 64, "bare-c64", bare.pid)
        self.stop(bare)

    def ingress_acceptance(self) -> None:
        amqp = self.vhost()
        env = env_for(self.database(migrate=False), amqp)
        ingress = self.start("ingress-acceptance", [PAYBUS, "ingress"], env)
        base = f"http://127.0.0.1:{env['INGRESS_PORT']}"
        ingress.wait_ready(f"{base}/readyz")
        for connections in (16, 64):
            self.results.ingress[connections] = self.run_load(
                f"{base}/webhook/stripe", connections, f"ingress-c{connections}", ingress.pid
            )
        self.results.rss["ingress"] = ingress.rss_mib()
        if self.args.profile:
            self.profile(ingress, f"{base}/webhook/stripe", "ingress")
        self.stop(ingress)

    def profile(self, process: Process, url: str, name: str) -> None:
        datafile = self.signed_file(name, events.succeeded(self.pool_size()))
        profile = profiling.Profile(process.pid, self.args.seconds, self.workdir / f"{name}.raw")
        result = run_wrk(url, datafile, 64, self.args.seconds)
        print(f"  {name} (profiled): {result.rate:,.0f}/s p99 {result.p99_ms:.2f} ms", flush=True)
        print(f"  profile: {profile.save(name, f'paybus {name} under wrk -c64')}", flush=True)

    def peer(self) -> None:
        node = require_peer()
        url = self.database(migrate=False)
        port = free_port()
        env = {"DATABASE_URL": url, "STRIPE_WEBHOOK_SECRET": TEST_SECRET, "PORT": str(port)}
        peer = self.start("peer", [str(node), "server.js"], env, cwd=PEER_DIR)
        peer.wait_ready(f"http://127.0.0.1:{port}/healthz", timeout=60)
        for connections in (16, 64):
            self.results.peer[connections] = self.run_load(
                f"http://127.0.0.1:{port}/webhooks", connections, f"peer-c{connections}", peer.pid
            )
        self.results.rss["peer"] = peer.rss_mib()
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM stripe.payment_intents").fetchone()
        self.results.peer_rows = int(row[0]) if row else 0
        self.stop(peer)

    def drain_and_e2e(self) -> None:
        amqp, url = self.vhost(), self.database()
        env = env_for(url, amqp)
        backlog = events.mixed(self.args.events)
        print(
            f"  publishing {len(backlog):,} mixed events (confirmed, {ceilings.IN_FLIGHT} in flight)",
            flush=True,
        )
        seconds = asyncio.run(ceilings.publish_events(amqp, backlog))
        self.results.publish_rate = len(backlog) / seconds
        print(f"  raw confirmed publish: {self.results.publish_rate:,.0f}/s", flush=True)

        inserts = events.mixed(min(self.args.events, 20_000))
        seconds = ceilings.batched_inserts(url, inserts)
        self.results.insert_rate = len(inserts) / seconds
        print(f"  raw batched inserts: {self.results.insert_rate:,.0f} rows/s", flush=True)

        started, busy = time.monotonic(), machine_busy()
        processor = self.start("processor", [PAYBUS, "processor"], env)
        processor.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz")
        settled = self.wait_applied(url, amqp, len(backlog), timeout=900 if not self.args.quick else 300)
        wall = time.monotonic() - started
        self.results.drain = self.drain_stats(url, settled, wall)
        self.results.drain["cpu_ms"] = 1000 * cpu_seconds(processor.pid) / max(settled, 1)
        self.results.drain["machine_ms"] = 1000 * (machine_busy() - busy) / max(settled, 1)
        self.results.drain["settled"] = settled
        print(
            f"  drain: {self.results.drain['rate']:,.0f}/s ({self.results.drain['seconds']:.1f} s from first "
            f"to last apply; {wall:.1f} s from process start)",
            flush=True,
        )

        ingress = self.start("ingress", [PAYBUS, "ingress"], env)
        base = f"http://127.0.0.1:{env['INGRESS_PORT']}"
        ingress.wait_ready(f"{base}/readyz")
        stream = events.mixed(self.args.rate * self.args.e2e_seconds)
        datafile = self.signed_file("e2e", [body for _, _, body in stream])
        load = self.start(
            "loadgen",
            [
                sys.executable,
                "-m",
                "tests.bench.loadgen",
                f"{base}/webhook/stripe",
                str(datafile),
                str(self.args.rate),
                str(self.args.e2e_seconds + 30),
            ],
            {},
            cwd=REPO,
        )
        load.proc.wait(timeout=self.args.e2e_seconds + 120)  # loadgen stops itself at e2e_seconds + 30
        self.results.e2e_load = _last_json(load.log_path)
        self.wait_applied(url, amqp, len(backlog) + len(stream), timeout=600)
        self.results.e2e = self.lag_stats(url, [event_id for event_id, _, _ in stream])
        self.results.rss["ingress (e2e)"] = ingress.rss_mib()
        self.results.rss["processor"] = processor.rss_mib()
        self.results.effects = self.effects(url)
        print(f"  end to end: {self.results.e2e} load {self.results.e2e_load}", flush=True)

        if self.args.profile:
            self.stop(ingress)
            more = events.mixed(5_000)
            asyncio.run(ceilings.publish_events(amqp, more))
            profile = profiling.Profile(processor.pid, 20, self.workdir / "processor.raw")
            self.wait_applied(url, amqp, len(backlog) + len(stream) + len(more), timeout=600)
            print(
                f"  profile: {profile.save('processor', 'paybus processor draining mixed events')}",
                flush=True,
            )
        self.stop(processor)
        self.drain_per_core(url, amqp, env)
        self.ledger_only()

    def ledger_only(self) -> None:
        """The ceiling of the drain: the same kind of backlog, a processor with no domain handlers."""
        amqp, url = self.vhost(), self.database()
        env = env_for(url, amqp)
        backlog = events.mixed(min(self.args.events, 20_000))
        asyncio.run(ceilings.publish_events(amqp, backlog))
        argv = ceilings.processor_with_handlers("none")
        processor = self.start("processor-ledger-only", argv, env, cwd=REPO)
        processor.wait_ready(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz")
        settled = self.wait_applied(url, amqp, len(backlog), timeout=300)
        self.results.ledger_only = self.drain_stats(url, settled, 0.0)
        self.results.ledger_only["cpu_ms"] = 1000 * cpu_seconds(processor.pid) / max(settled, 1)
        self.stop(processor)
        print(f"  processor, ledger only: {self.results.ledger_only['rate']:,.0f}/s", flush=True)

    def drain_per_core(self, url: str, amqp: str, env: dict[str, str]) -> None:
        """The drain again with one processor per core, sharing the queue as replicas do.

        One processor keeps about two thirds of this machine busy (it waits on Postgres for the rest);
        the peer's webhook figure is taken with both cores busy. This row is the like-for-like one.
        The tables hold the first drain and the end-to-end run by now, so this drain is not favoured.
        They are analyzed first, as autovacuum would have done by now: the Postgres of this machine
        class runs with `autovacuum = off`, and without statistics the planner reads 30,000 charges
        row by row to find a batch's 150 (`tests/bench/README.md`, "Statistics").
        """
        count = os.cpu_count() or 1
        backlog = events.mixed(self.args.events)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE")
            row = conn.execute("SELECT count(*) FROM stripe_events WHERE processed_at IS NOT NULL").fetchone()
        before = int(row[0]) if row else 0
        asyncio.run(ceilings.publish_events(amqp, backlog))
        started, busy = time.monotonic(), machine_busy()
        processors = []
        for index in range(1, count + 1):
            own = {**env, "METRICS_PORT": str(free_port())}
            processors.append(self.start(f"processor-{index}", [PAYBUS, "processor"], own))
            processors[-1].wait_ready(f"http://127.0.0.1:{own['METRICS_PORT']}/readyz")
        settled = self.wait_applied(
            url, amqp, before + len(backlog), timeout=900 if not self.args.quick else 300
        )
        settled -= before
        wall = time.monotonic() - started
        ids = [event_id for event_id, _, _ in backlog]
        self.results.drain_per_core = self.drain_stats(url, settled, wall, ids)
        self.results.drain_per_core["machine_ms"] = 1000 * (machine_busy() - busy) / max(settled, 1)
        self.results.drain_per_core["settled"] = settled
        self.results.drain_per_core["processors"] = count
        for process in processors:
            self.stop(process)
        print(
            f"  drain with {count} processors: {self.results.drain_per_core['rate']:,.0f}/s "
            f"({self.results.drain_per_core['seconds']:.1f} s from first to last apply)",
            flush=True,
        )

    def wait_applied(self, url: str, amqp: str, expected: int, timeout: float) -> int:
        """Watch the queue (cheap) until it is empty, then the ledger until every event is settled.

        Returns the settled count. When fewer than ``expected`` can arrive (the end-to-end run may see 503s
        under overload), the count is taken as final once it has not moved for five seconds; when the
        time bound runs out, what settled so far is reported (the table shows the count).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if asyncio.run(_queue_ready(amqp)) == 0:
                break
            time.sleep(0.5)
        last, still_since = -1, time.monotonic()
        with psycopg.connect(url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) FROM stripe_events WHERE processed_at IS NOT NULL"
                ).fetchone()
                settled = int(row[0]) if row else 0
                if settled >= expected:
                    return settled
                if settled != last:
                    last, still_since = settled, time.monotonic()
                elif time.monotonic() - still_since > 5 and asyncio.run(_queue_ready(amqp)) == 0:
                    return settled
                time.sleep(0.5)
            row = conn.execute("SELECT count(*) FROM stripe_events WHERE processed_at IS NOT NULL").fetchone()
        settled = int(row[0]) if row else 0
        print(f"  note: {settled:,} of {expected:,} events settled when the {timeout:.0f} s bound ran out")
        return settled

    def drain_stats(self, url: str, count: int, wall: float, ids: list[str] | None = None) -> dict[str, Any]:
        """Events/s from the first to the last apply (of ``ids``, if given; else of the whole ledger)."""
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM max(processed_at) - min(processed_at)) FROM stripe_events"
                " WHERE %(ids)s::text[] IS NULL OR id = ANY(%(ids)s)",
                {"ids": ids},
            ).fetchone()
        span = float(row[0]) if row and row[0] else wall
        return {"seconds": span, "rate": count / span if span else 0.0, "wall": wall}

    def lag_stats(self, url: str, ids: list[str]) -> dict[str, float]:
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag), "
                "       percentile_cont(0.99) WITHIN GROUP (ORDER BY lag), max(lag), count(*)"
                "  FROM (SELECT extract(epoch FROM processed_at - received_at) * 1000 AS lag"
                "          FROM stripe_events WHERE id = ANY(%s)) AS lags",
                (ids,),
            ).fetchone()
        assert row is not None
        return {
            "p50_ms": float(row[0] or 0),
            "p99_ms": float(row[1] or 0),
            "max_ms": float(row[2] or 0),
            "count": int(row[3]),
        }

    def effects(self, url: str) -> dict[str, Any]:
        counts: dict[str, Any] = {}
        with psycopg.connect(url) as conn:
            for outcome, n in conn.execute(
                "SELECT coalesce(outcome, 'pending'), count(*) FROM stripe_events GROUP BY 1"
            ):
                counts[f"ledger {outcome}"] = n
            for table in ("payments", "entitlements", "outbox", "subscriptions", "invoices"):
                with contextlib.suppress(psycopg.Error):
                    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 - fixed names
                    counts[table] = row[0] if row else 0
        return counts


async def _queue_ready(amqp: str) -> int:
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(EVENTS_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)


def _last_json(path: Path) -> dict[str, Any]:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.startswith("{")]
    return dict(json.loads(lines[-1])) if lines else {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require_wrk()
        if not args.skip_peer:
            require_peer()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="paybus-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        bench.results.load_before = loadavg()
        try:
            print("ceiling: bare aiohttp POST", flush=True)
            bench.bare_ceiling()
            print("ingress acceptance", flush=True)
            bench.ingress_acceptance()
            if not args.skip_peer:
                print("peer: stripe-sync-engine", flush=True)
                bench.peer()
            print("processor drain, ceilings and end to end", flush=True)
            bench.drain_and_e2e()
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            for log in sorted(Path(tmp).glob("*.log")):
                print(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-1500:]}", file=sys.stderr)
            return 1
        finally:
            bench.cleanup()
        bench.results.load_after = loadavg()
    print()
    print(render(bench.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
