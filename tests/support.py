"""Test helpers: unique databases and vhosts, waiting on conditions, running paybus as a user does."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aio_pika

from ingress.signature import signature_header
from shared import samples

REPO = Path(__file__).resolve().parent.parent
PG_BASE = os.environ.get("PAYBUS_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP_BASE = os.environ.get("PAYBUS_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
TEST_SECRET = "whsec_test_paybus_suite_secret"
T = TypeVar("T")


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def database_url(name: str) -> str:
    return f"{PG_BASE}/{name}"


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True).stdout


def create_vhost(name: str) -> str:
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return f"{AMQP_BASE}/{quote(name, safe='')}"


def delete_vhost(name: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(
    check: Callable[[], Awaitable[T]],
    timeout: float = 15.0,  # noqa: ASYNC109 - a polling helper, not an I/O call
    interval: float = 0.05,
) -> T:
    """Poll ``check`` until it returns a truthy value; fail with the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T = await check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")
        await asyncio.sleep(interval)
        last = await check()
    return last


def wait_for_sync(check: Callable[[], T], timeout: float = 15.0, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    last = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")
        time.sleep(interval)
        last = check()
    return last


async def queue_depth(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


def signed(
    envelope: Mapping[str, Any] | bytes, secret: str = TEST_SECRET, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    body = envelope if isinstance(envelope, bytes) else samples.encode(dict(envelope))
    header = signature_header(body, secret, timestamp or int(time.time()))
    return body, {"Stripe-Signature": header, "Content-Type": "application/json"}


class Service:
    """A paybus service started the way a user starts it: `.venv/bin/paybus <name>` with env vars."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        paybus = Path(sys.executable).parent / "paybus"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(paybus), self.name], env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def wait_ready(self, url: str, timeout: float = 20.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for_sync(ready, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


async def drain_queue(amqp_url: str, queue_name: str) -> list[Any]:
    """Take every message now in ``queue_name`` (no ack needed: they are gone once read)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        messages = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            messages.append(message)
        return messages
