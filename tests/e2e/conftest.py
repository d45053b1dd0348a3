"""Real `paybus ingress` and `paybus processor` processes against the session's database and vhost."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import env_for
from tests.support import Service


class Stack:
    """One ingress and one processor, started as a user starts them."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.ingress = Service("ingress", env, logs / "ingress.log")
        self.processor = Service("processor", env, logs / "processor.log")

    @property
    def webhook_url(self) -> str:
        token = self.env.get("WEBHOOK_PATH_TOKEN")
        return f"http://127.0.0.1:{self.env['INGRESS_PORT']}/webhook/stripe" + (f"/{token}" if token else "")

    def start_ingress(self) -> None:
        self.ingress.start().wait_ready(f"http://127.0.0.1:{self.env['INGRESS_PORT']}/readyz")

    def start_processor(self) -> None:
        self.processor = Service("processor", self.env, self.logs / "processor.log").start()
        self.processor.wait_ready(f"http://127.0.0.1:{self.env['METRICS_PORT']}/readyz")

    def stop(self) -> None:
        self.ingress.stop()
        self.processor.stop()


@pytest.fixture
def stack_factory(database: str, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(amqp: str, **extra: str) -> Stack:
        stack = Stack(env_for(database, amqp, **extra), tmp_path)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
