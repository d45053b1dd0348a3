"""INGRESS_WORKERS > 1: the first process starts the others; all share the port with SO_REUSEPORT."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

log = logging.getLogger("paybus.ingress")

# Set on the processes the first one starts; they serve and start nobody. Not a setting.
WORKER_ENV: Final = "PAYBUS_INGRESS_WORKER"
_PR_SET_PDEATHSIG: Final = 1


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def _die_with_parent() -> None:
    # Linux: SIGTERM this worker when the first process dies, even by SIGKILL, so no orphan keeps serving.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Workers:
    """The extra ingress processes of one first process: started before it serves, stopped with it."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._procs: list[subprocess.Popen[bytes]] = []
        self._stopping = False
        self.failed = False

    def attach(self, app: web.Application, timeout: float) -> None:
        """Start with ``app`` (before its publisher) and stop after it; a worker's death stops ``app``."""

        async def lifecycle(app: web.Application) -> AsyncIterator[None]:
            self.start()
            watching = asyncio.create_task(self.watch(), name="ingress-workers")
            yield
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            await self.stop(timeout)

        async def terminate(app: web.Application) -> None:
            self.terminate()  # at once, so every process drains its in-flight requests in parallel

        app.cleanup_ctx.insert(0, lifecycle)
        app.on_shutdown.append(terminate)

    def start(self) -> None:
        for index in range(1, self._count + 1):
            env = {**os.environ, WORKER_ENV: str(index)}
            self._procs.append(
                subprocess.Popen(  # noqa: S603 - our own interpreter and module
                    [sys.executable, "-m", "ingress"], env=env, preexec_fn=_die_with_parent
                )
            )
        log.info("started %d more ingress worker(s): pids %s", self._count, [p.pid for p in self._procs])

    async def watch(self) -> None:
        """If a worker dies, stop the whole ingress (exit status 1): the service manager restarts it."""
        while True:
            await asyncio.sleep(0.5)
            for proc in self._procs:
                if proc.poll() is not None and not self._stopping:
                    log.error(
                        "ingress worker %d exited with %s; stopping the ingress", proc.pid, proc.returncode
                    )
                    self.failed = True
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

    def terminate(self) -> None:
        """SIGTERM every worker, once: each stops accepting and finishes its in-flight requests.

        Once only: a second SIGTERM reaching a worker in the middle of its own shutdown interrupts it
        there (aiohttp raises GracefulExit again), and a broker connection half closed then never
        finishes closing, so the worker hangs until it is killed.
        """
        if self._stopping:
            return
        self._stopping = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 - bounded like run_app's shutdown
        """Terminate every worker and wait for all of them (SIGKILL after ``timeout``)."""
        self.terminate()
        for proc in self._procs:
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
