"""Private Postgres clusters and RabbitMQ nodes that a test may stop, kill and restart.

The machine's shared services are never touched: each instance has its own name, ports and data
directory, owned by the `postgres` / `rabbitmq` user as the server scripts require.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.support import free_port


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.1)


def pg_version() -> str:
    return max(os.listdir("/usr/lib/postgresql"), key=lambda v: int(v.split(".")[0]))


class PrivatePostgres:
    """A `pg_createcluster` cluster on its own port with trust auth, dropped by ``destroy``."""

    def __init__(self) -> None:
        self.version = pg_version()
        self.name = f"paybus_{uuid.uuid4().hex[:10]}"
        self.port = free_port()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create(self) -> PrivatePostgres:
        subprocess.run(
            [
                "pg_createcluster",
                self.version,
                self.name,
                "-p",
                str(self.port),
                "--pgoption",
                "max_connections=200",
                "--",
                "--auth=trust",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return self

    def start(self) -> None:
        subprocess.run(
            ["pg_ctlcluster", self.version, self.name, "start"], check=True, capture_output=True, timeout=120
        )
        _wait(lambda: _port_open(self.port), 60, "postgres accepting connections")

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            ["pg_ctlcluster", self.version, self.name, "stop", "-m", mode],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def destroy(self) -> None:
        subprocess.run(
            ["pg_dropcluster", "--stop", self.version, self.name],
            capture_output=True,
            timeout=120,
            check=False,
        )


class PrivateRabbit:
    """A RabbitMQ node of its own (name, AMQP and distribution ports, data dir owned by `rabbitmq`)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"paybus-{uuid.uuid4().hex[:8]}@localhost"
        self.base = Path(tempfile.mkdtemp(prefix="paybus-rabbit-"))
        self.proc: subprocess.Popen[bytes] | None = None
        (self.base / "mnesia").mkdir()
        (self.base / "log").mkdir()
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        owner = pwd.getpwnam("rabbitmq")
        for root, _, files in os.walk(self.base):
            for path in (root, *(os.path.join(root, f) for f in files)):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 120) -> str:
        return subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.node, *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        ).stdout

    def start(self) -> None:
        # `rabbitmq-server` run as root drops to the `rabbitmq` user; it runs in the foreground here
        self.proc = subprocess.Popen(
            ["rabbitmq-server"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait(lambda: _port_open(self.port) or self.proc.poll() is not None, 120, "rabbitmq listening")  # type: ignore[union-attr]
        assert self.proc.poll() is None, f"rabbitmq node exited; logs in {self.base / 'log'}"
        self.ctl("await_startup", "--timeout", "60")

    def stop(self) -> None:
        self.ctl("stop")
        if self.proc is not None:
            self.proc.wait(timeout=60)

    def kill(self) -> None:
        """SIGKILL the Erlang VM: a crash, not a shutdown (confirmed messages must survive it)."""
        pid = int((self.base / "pid").read_text().strip())
        os.kill(pid, 9)
        if self.proc is not None:
            self.proc.wait(timeout=60)
        _wait(lambda: not _port_open(self.port), 30, "rabbitmq gone")

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(
                ["rabbitmqctl", "-q", "-n", self.node, "stop"], capture_output=True, timeout=120, check=False
            )
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        shutil.rmtree(self.base, ignore_errors=True)
