"""The bench's plumbing: tools it needs, processes it starts, wrk runs, memory of a process tree."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import wait_for_sync

HERE = Path(__file__).resolve().parent
PEER_DIR = HERE / "peer"
LUA = HERE / "load.lua"


class BenchError(RuntimeError):
    """The bench cannot run here; the message says what to install or fix."""


def require_wrk() -> str:
    """wrk drives the throughput runs: a C load generator costs far less CPU than the server it loads."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk (apt-get install -y wrk) ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, capture_output=True)
        found = shutil.which("wrk")
        if found:
            return found
    raise BenchError("wrk is needed for the load runs: install it with `apt-get install wrk` (Debian/Ubuntu)")


def require_peer() -> Path:
    """Install the peer's pinned packages (package-lock.json) into the git-ignored node_modules."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise BenchError("the peer needs Node.js >= 18 and npm: `apt-get install nodejs npm`")
    stamp = PEER_DIR / "node_modules" / ".package-lock.json"
    lock = PEER_DIR / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        print("installing the peer (npm ci in tests/bench/peer) ...", flush=True)
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=PEER_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise BenchError(f"npm ci failed in {PEER_DIR}:\n{done.stderr[-2000:]}")
    return Path(node)


def ensure_py_spy() -> str:
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        print("installing py-spy into .venv for --profile ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "py-spy==0.4.3",
            ],
            check=True,
        )
    return str(exe)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback only
            return bool(response.status == 200)
    except OSError:
        return False


class Process:
    """A child process with its log in a file; stopped with SIGTERM, then SIGKILL."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None
    ):
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, url: str, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            return http_ok(url)

        wait_for_sync(ready, timeout=timeout, interval=0.1)

    def rss_mib(self) -> float:
        return rss_mib(self.pid)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            found.extend(int(p) for p in text)
    except OSError:
        return []
    return found


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` and all its descendants (worker processes count towards the service)."""
    total_kib = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
        stack.extend(children(current))
    return total_kib / 1024


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    wrapped: int = 0
    cpu_ms: float = 0.0  # server CPU time per request: steadier than rates on a shared machine
    # CPU of the whole machine per request (server, its broker or database, and wrk): on 2 cores the
    # rate cannot exceed 2,000 / machine_ms per second, whatever the server does
    machine_ms: float = 0.0
    # whether the broker's quorum-queue write-ahead log rolled over to a new file during the run (None:
    # not known). A roll holds confirms back for tens of milliseconds: it shows in a short run's p99.
    wal_rolled: bool | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants so far (from /proc/PID/stat)."""
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        total += own_cpu(current)
        stack.extend(children(current))
    return total


def own_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` alone (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    url: str, datafile: Path, connections: int, seconds: int, server_pid: int | None = None, threads: int = 1
) -> LoadResult:
    argv = [
        require_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
        "--",
        str(datafile),
        str(threads),
    ]
    cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
    busy_before = machine_busy()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 180, check=False)
    cpu = cpu_seconds(server_pid) - cpu_before if server_pid else 0.0
    busy = machine_busy() - busy_before
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr[-1000:]} {done.stdout[-1000:]}")
    data: dict[str, Any] = json.loads(lines[-1])
    errors = sum(int(data[k]) for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        requests=int(data["requests"]),
        seconds=int(data["duration_us"]) / 1e6,
        errors=errors,
        p50_ms=int(data["p50_us"]) / 1000,
        p99_ms=int(data["p99_us"]) / 1000,
        wrapped=int(data["wrapped"]),
        cpu_ms=1000 * cpu / int(data["requests"]) if server_pid and int(data["requests"]) else 0.0,
        machine_ms=1000 * busy / max(int(data["requests"]), 1),
    )


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far, all cores (from the first line of /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def elapsed(start: float) -> float:
    return time.monotonic() - start


WAL_GLOB = "/var/lib/rabbitmq/mnesia/*/quorum/*/*.wal"


def quorum_wal_files() -> list[str] | None:
    """The local RabbitMQ node's quorum-queue WAL file names, or None when they cannot be read here."""
    try:
        names = sorted(Path(p).name for p in glob.glob(WAL_GLOB))
    except OSError:
        return None
    return names or None
