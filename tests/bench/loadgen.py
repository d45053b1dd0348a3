"""Open-loop load at a fixed rate: request i leaves at start + i/rate, whatever the answers do.

Run as `python -m tests.bench.loadgen URL DATAFILE RATE LIMIT_S` in its own process (the file holds one
pre-signed ``signature<TAB>body`` line per event; every line is sent at most once). When the server
cannot keep up and the in-flight bound holds requests back, it stops starting new ones after LIMIT_S
seconds and counts the rest as unsent. Prints one JSON line.
A closed-loop tool (wrk) slows down when the server does and so hides queueing; this one does not.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp

MAX_IN_FLIGHT = 512  # a bound, so a stalled server cannot make this process grow without limit


async def main(url: str, datafile: str, rate: float, limit: float) -> dict[str, float]:
    with open(datafile, "rb") as source:  # noqa: ASYNC230 - read once, before any request
        lines = [line.rstrip(b"\n").split(b"\t", 1) for line in source]
    latencies: list[float] = []
    errors = 0
    late = 0
    in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
    connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(sig: bytes, body: bytes) -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                async with session.post(
                    url,
                    data=body,
                    headers={"Stripe-Signature": sig.decode(), "Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
            finally:
                latencies.append(time.perf_counter() - started)
                in_flight.release()

        tasks = set()
        start = time.perf_counter()
        unsent = 0
        for i, (sig, body) in enumerate(lines):
            if time.perf_counter() - start > limit:
                unsent = len(lines) - i
                break
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.05:
                late += 1
            await in_flight.acquire()
            task = asyncio.create_task(send(sig, body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        offered_for = time.perf_counter() - start
        await asyncio.gather(*tasks)
    latencies.sort()
    n = len(latencies)
    return {
        "sent": n,
        "unsent": unsent,
        "errors": errors,
        "late": late,
        "offered_rate": n / offered_for if offered_for else 0.0,
        "p50_ms": latencies[n // 2] * 1000 if n else 0.0,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
    }


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
    print(json.dumps(result), flush=True)
