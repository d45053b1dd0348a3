"""The ingress's own CPU profile: its real app and publisher in this process under cProfile, loaded by wrk.

Run as `python -m tests.bench.profile_ingress [SECONDS]`. py-spy attached to `paybus ingress` sees the
process almost always parked in epoll (it waits on broker confirms), so its samples say little about
the CPU each request costs; cProfile counts every call instead. The output (top functions by own time
and by cumulative time) goes to tests/bench/profiles/ingress-cprofile.txt.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from ingress.app import create_app
from shared.config import load_settings
from shared.logs import setup_logging
from shared.publisher import Publisher
from shared.telemetry import PropagatingTracer  # what `paybus ingress` runs without an exporter
from tests.bench import events
from tests.bench.harness import run_wrk
from tests.bench.profiling import PROFILES
from tests.conftest import env_for
from tests.support import TEST_SECRET, create_vhost, delete_vhost, free_port, unique


async def main(seconds: int) -> str:
    name = unique("paybus_bench")
    amqp = create_vhost(name)
    try:
        settings = load_settings(env_for("postgresql:///unused", amqp))
        setup_logging("INFO")
        publisher = Publisher(settings.amqp_url, settings.publish_timeout)
        runner = web.AppRunner(create_app(settings, publisher, tracer=PropagatingTracer()), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await publisher.wait_connected(20)
        with tempfile.TemporaryDirectory() as tmp:
            datafile = Path(tmp) / "load.tsv"
            events.write_signed(datafile, events.succeeded(6_000 * seconds), TEST_SECRET)
            profiler = cProfile.Profile()
            profiler.enable()
            result = await asyncio.to_thread(
                run_wrk, f"http://127.0.0.1:{port}/webhook/stripe", datafile, 64, seconds
            )
            profiler.disable()
        await runner.cleanup()
    finally:
        delete_vhost(name)
    out = io.StringIO()
    out.write(
        f"# ingress in-process under cProfile, wrk -c64 for {seconds} s: {result.rate:,.0f} requests/s,"
        f" p99 {result.p99_ms:.1f} ms, {result.requests:,} requests, errors {result.errors}\n"
        "# (cProfile slows everything it counts; read shares, not absolute times)\n\n"
    )
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(35)
    return out.getvalue()


if __name__ == "__main__":
    report = asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8))
    PROFILES.mkdir(exist_ok=True)
    path = PROFILES / "ingress-cprofile.txt"
    path.write_text(report.replace(str(Path(sys.prefix)), "<venv>"))
    print(report[:6000])
    print(f"written to {path}")
