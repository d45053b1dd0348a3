"""`paybus ingress` with INGRESS_WORKERS=2: both serve one port, SIGTERM stops both, nothing is lost."""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shared import samples
from shared.amqp import EVENTS_QUEUE
from tests.e2e.conftest import Stack
from tests.e2e.test_pipeline import _post
from tests.support import drain_queue, wait_for_sync

# Odd, so the two processes' counts always differ: the test tells them apart by their counts, and with
# an even number an exact half-and-half split (one run in six at 24) looked like a single process.
EVENTS = 25
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01")


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(p) for p in (task / "children").read_text().split())
    return found


def _listening(pid: int, port: str) -> bool:
    """Whether process ``pid`` holds a socket listening on ``port`` (from /proc: its fds and the table)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if local_port == int(port) and state == "0A" and inode in inodes:  # 0A: LISTEN
                return True
    return False


def _ready(port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:  # noqa: S310
            return bool(response.status == 200)
    except OSError:
        return False


def _accepted_by_one_process(port: str) -> int:
    # a new connection per scrape: SO_REUSEPORT hands each to one of the processes
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # noqa: S310
        for family in text_string_to_metric_families(response.read().decode()):
            for sample in family.samples:
                if sample.name == "paybus_webhooks_total" and sample.labels == {"outcome": "accepted"}:
                    return int(sample.value)
    raise AssertionError("no accepted counter")


async def test_two_workers_share_the_port_and_sigterm_stops_both(
    stack_factory: Callable[..., Stack], make_vhost: Callable[[], str]
) -> None:
    amqp = make_vhost()
    stack = stack_factory(amqp, INGRESS_WORKERS="2")
    stack.start_ingress()
    assert stack.ingress.proc is not None
    main = stack.ingress.proc.pid
    wait_for_sync(lambda: len(_children(main)) == 1, timeout=20)
    [worker] = _children(main)
    # each process listens once its own broker connection is up, then answers /readyz for itself
    wait_for_sync(lambda: stack.ingress.log().count("connected to RabbitMQ") == 2, timeout=20)
    # "connected" comes before the worker binds the port: until it does, every request goes to the first
    wait_for_sync(lambda: _listening(worker, stack.env["INGRESS_PORT"]), timeout=20)
    wait_for_sync(lambda: all(_ready(stack.env["INGRESS_PORT"]) for _ in range(20)), timeout=20)

    ids = []
    for _ in range(EVENTS):
        envelope = samples.sample_event("payment_intent.succeeded")
        ids.append(envelope["id"])
        assert _post(stack.webhook_url, envelope) == 200

    # each process counts what it accepted; two different counts that add up to all: both served
    seen = {_accepted_by_one_process(stack.env["INGRESS_PORT"]) for _ in range(40)}
    assert len(seen) == 2 and sum(seen) == EVENTS, seen

    assert stack.ingress.stop() == 0
    assert not os.path.exists(f"/proc/{worker}"), "the worker stopped with the first process"

    messages = await drain_queue(amqp, EVENTS_QUEUE)
    assert sorted(m.headers["stripe-event-id"] for m in messages) == sorted(ids)
    # no trace exporter configured: the trace context still travels to the processor
    assert all(TRACEPARENT.fullmatch(str(m.headers["traceparent"])) for m in messages)


def test_a_dead_worker_stops_the_ingress_with_status_1(
    stack_factory: Callable[..., Stack], make_vhost: Callable[[], str]
) -> None:
    stack = stack_factory(make_vhost(), INGRESS_WORKERS="2")
    stack.start_ingress()
    assert stack.ingress.proc is not None
    main = stack.ingress.proc.pid
    wait_for_sync(lambda: len(_children(main)) == 1, timeout=20)
    [worker] = _children(main)
    os.kill(worker, signal.SIGKILL)
    assert stack.ingress.proc.wait(timeout=30) == 1
