"""A 3-node RabbitMQ cluster started here loses the node that leads the event queue mid-stream, and
nothing is lost: every event Stripe got a 200 for is applied once, the final state is the predicted one.

Runs under `make cluster-test` (PAYBUS_CLUSTER_TEST=1): starting three brokers takes longer than
`make test` allows. The nodes are private: their own names, ports, epmd port and data directories
(owned by the `rabbitmq` user); the machine's own node is never touched.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from shared import db
from tests.e2e.test_scale_out import Stack, Stream, build_stream, final_state, processed, send_all
from tests.support import database_url, free_port, queue_depth, unique, wait_for, wait_for_sync

EVENTS: Final = int(os.environ.get("PAYBUS_CLUSTER_EVENTS", "1500"))
RABBIT_BIN: Final = Path("/usr/lib/rabbitmq/bin")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not os.environ.get("PAYBUS_CLUSTER_TEST"), reason="run with `make cluster-test`"),
    pytest.mark.skipif(not (RABBIT_BIN / "rabbitmq-server").exists(), reason="RabbitMQ is not installed"),
]


@dataclass(frozen=True)
class Node:
    name: str
    amqp_port: int
    dist_port: int
    base: Path

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"


class LocalCluster:
    """Three RabbitMQ nodes on loopback, clustered with join_cluster, each killable on its own."""

    def __init__(self, size: int = 3) -> None:
        self.tag = unique("pb")[-8:]
        self.root = Path(tempfile.mkdtemp(prefix=f"paybus-cluster-{self.tag}-"))
        self.root.chmod(0o755)  # the rabbitmq user must reach its data directories
        ports: set[int] = set()
        while len(ports) < 1 + 2 * size:  # distinct, though each is only free when picked
            ports.add(free_port())
        self.epmd_port, *node_ports = sorted(ports)
        self.nodes = [
            Node(
                f"pbt{self.tag}n{i}@localhost",
                node_ports[2 * i - 2],
                node_ports[2 * i - 1],
                self.root / f"n{i}",
            )
            for i in range(1, size + 1)
        ]
        (self.root / "rabbitmq.conf").write_text("loopback_users.guest = true\nlog.file.level = warning\n")
        (self.root / "rabbitmq-env.conf").write_text("")  # not the machine's: it names the default node
        (self.root / "enabled_plugins").write_text("[].\n")
        for node in self.nodes:
            (node.base / "mnesia").mkdir(parents=True)
            (node.base / "log").mkdir()
        shutil.chown(self.root, "rabbitmq", "rabbitmq")
        for path in self.root.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def env(self, node: Node) -> dict[str, str]:
        return {
            "HOME": "/var/lib/rabbitmq",  # the rabbitmq user's Erlang cookie
            "PATH": "/usr/lib/rabbitmq/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "RABBITMQ_PID_FILE": str(node.base / "rabbitmq.pid"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _as_rabbitmq(self, node: Node, *command: str) -> list[str]:
        variables = [f"{key}={value}" for key, value in self.env(node).items()]
        return ["runuser", "-u", "rabbitmq", "--", "env", "-i", *variables, *command]

    def ctl(self, node: Node, *args: str, timeout: float = 60, check: bool = True) -> str:
        command = self._as_rabbitmq(node, str(RABBIT_BIN / "rabbitmqctl"), "-q", "-n", node.name, *args)
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {' '.join(args)} on {node.name}: {result.stderr or result.stdout}"
            )
        return result.stdout

    def start_node(self, node: Node) -> None:
        log = (node.base / "server.out").open("ab")
        command = self._as_rabbitmq(node, str(RABBIT_BIN / "rabbitmq-server"))
        self.processes[node.name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def await_node(self, node: Node) -> None:
        """await_startup fails at once while the node has not registered with epmd yet: ask again."""

        def up() -> bool:
            process = self.processes[node.name]
            if process.poll() is not None:
                output = (node.base / "server.out").read_text(errors="replace")[-3000:]
                raise AssertionError(f"{node.name} exited with {process.returncode}: {output}")
            command = self._as_rabbitmq(node, str(RABBIT_BIN / "rabbitmqctl"), "-q", "-n", node.name)
            result = subprocess.run(
                [*command, "await_startup", "--timeout", "60"], capture_output=True, timeout=90
            )
            return result.returncode == 0

        wait_for_sync(up, timeout=240, interval=1.0)

    def start(self) -> None:
        first, *others = self.nodes
        for node in self.nodes:
            self.start_node(node)
        for node in self.nodes:
            self.await_node(node)
        for node in others:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        wait_for_sync(lambda: len(self.running_nodes(first)) == len(self.nodes), timeout=60, interval=0.5)

    def running_nodes(self, via: Node) -> list[str]:
        out = self.ctl(via, "cluster_status", "--formatter", "json", check=False)
        try:
            running = json.loads(out).get("running_nodes", [])
        except ValueError:
            return []
        return [node.name for node in self.nodes if node.name in running]

    def leader_of(self, queue: str, via: Node) -> Node:
        out = self.ctl(via, "list_queues", "--no-table-headers", "name", "leader")
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == queue:
                return next(node for node in self.nodes if node.name == parts[1])
        raise AssertionError(f"{queue} not found: {out}")

    def members_of(self, queue: str, via: Node) -> str:
        out = self.ctl(via, "list_queues", "--no-table-headers", "name", "members")
        return next((line for line in out.splitlines() if line.split() and line.split()[0] == queue), "")

    def kill(self, node: Node) -> None:
        """SIGKILL the node's Erlang VM: no clean shutdown, no handover."""
        pid = int((node.base / "rabbitmq.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        self.processes[node.name].wait(timeout=30)

    def stop(self) -> None:
        for node in self.nodes:
            process = self.processes.get(node.name)
            if process is not None and process.poll() is None:
                self.ctl(node, "stop", timeout=60, check=False)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        subprocess.run(
            ["epmd", "-port", str(self.epmd_port), "-kill"], capture_output=True, check=False, timeout=10
        )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    made = LocalCluster()
    try:
        made.start()
        yield made
    finally:
        made.stop()


@pytest.fixture(scope="module")
def stream() -> Stream:
    return build_stream(EVENTS, seed=3)


async def test_losing_the_event_queue_leader_mid_stream_loses_nothing(
    cluster: LocalCluster, stream: Stream, tmp_path: Path
) -> None:
    first = cluster.nodes[0]
    assert len(cluster.running_nodes(first)) == 3
    database = database_url(unique("paybus_cluster"))
    db.migrate(database)
    stack = Stack(first.amqp_url, database, tmp_path)
    try:
        # processors on every node, ingresses on the first two: whichever node dies, one of each
        # survives; the first declaring client is on node 1, so the leader and an ingress usually share it
        stack.start(2, 3, [node.amqp_url for node in cluster.nodes])
        members = cluster.members_of("paybus.stripe-events", first)
        assert all(node.name in members for node in cluster.nodes), members  # replicated to all three
        victim = cluster.leader_of("paybus.stripe-events", first)
        survivor = next(node for node in cluster.nodes if node != victim)
        counts: dict[str, int] = {}

        async def kill_mid_stream() -> float:
            await wait_for(lambda: _at_least(counts, len(stream.deliveries) // 3), timeout=300, interval=0.05)
            cluster.kill(victim)
            return time.monotonic()

        killer = asyncio.create_task(kill_mid_stream())
        await send_all(stream.deliveries, stack.webhook_urls, counts=counts, deadline=400)
        killed_at = await killer
        assert counts["ok"] == len(stream.deliveries)  # every delivery acknowledged with a 200 in the end
        await wait_for(
            lambda: _all(database, stream), timeout=max(120.0, len(stream.deliveries) / 20), interval=0.5
        )
        assert len(cluster.running_nodes(survivor)) == 2
        new_leader = cluster.leader_of("paybus.stripe-events", survivor)
        assert new_leader != victim
        assert await queue_depth(survivor.amqp_url, "paybus.dead-letter") == 0
        state = final_state(database, stream)
        print(
            f"\nkilled {victim.name} (leader of paybus.stripe-events) after {len(stream.deliveries) // 3} "
            f"accepted deliveries; {counts['retried']} retried deliveries; new leader {new_leader.name}; "
            f"all applied {time.monotonic() - killed_at:.1f}s after the kill"
        )
    finally:
        stack.stop()
        db.drop_database(database)
    assert [tuple(row) for row in state["payments"]] == [stream.expected[i] for i in stream.intents]
    distinct = len(stream.event_ids)
    assert state["events"] == (distinct, distinct, 0)


async def _at_least(counts: dict[str, int], n: int) -> bool:
    return counts.get("ok", 0) >= n


async def _all(database: str, stream: Stream) -> bool:
    return await processed(database, stream.event_ids) == len(stream.event_ids)
