"""Fixtures for deployment tests: paybus's broker users imported into a vhost of their own."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from tests.support import AMQP_BASE, PG_BASE, REPO, rabbitmqctl, unique, wait_for_sync

DEFINITIONS = REPO / "deploy" / "rabbitmq" / "definitions.json"
ROLES_SQL = REPO / "deploy" / "postgres" / "roles.sql"
GRANTS_SQL = REPO / "deploy" / "postgres" / "grants.sql"
ROLES = ("paybus-ingress", "paybus-processor", "paybus-client", "paybus-operator")


def load_script(path: Path) -> ModuleType:
    """Import a stand-alone deploy/ script (deploy/ is not a package) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Broker:
    """The committed definitions, imported with unique user names into a fresh vhost."""

    vhost: str
    users: dict[str, str]  # role (e.g. paybus-ingress, or "nopassword") -> unique user name
    passwords: dict[str, str]  # role -> password
    definitions: dict[str, Any]

    def url(self, role: str) -> str:
        host = AMQP_BASE.split("@", 1)[1]
        credentials = f"{quote(self.users[role])}:{quote(self.passwords[role])}"
        return f"amqp://{credentials}@{host}/{quote(self.vhost, safe='')}"


def _listed(kind: str, vhost: str) -> set[str]:
    out = rabbitmqctl(f"list_{kind}", "-p", vhost, "--no-table-headers", "name")
    return {line.strip() for line in out.splitlines() if line.strip()}


def import_definitions(definitions: dict[str, Any], vhost: str) -> None:
    """``rabbitmqctl import_definitions`` returns before the import is applied: wait for its queues."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(definitions, handle)
    # the broker's own process reads the file
    Path(handle.name).chmod(0o644)
    try:
        rabbitmqctl("import_definitions", handle.name)
        wanted = {q["name"] for q in definitions["queues"]}
        wait_for_sync(lambda: wanted <= _listed("queues", vhost), timeout=30, interval=0.5)
    finally:
        Path(handle.name).unlink()


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    set_passwords = load_script(REPO / "deploy" / "rabbitmq" / "set_passwords.py")
    source = json.loads(DEFINITIONS.read_text())
    vhost = unique("paybus_deploy")
    tag = vhost.rsplit("_", 1)[1]
    users = {role: f"{role}-{tag}" for role in ROLES}
    passwords = {role: unique("pw") for role in ROLES}
    # the committed file, with the test's names; passwords go through the operator's own tool
    renamed = json.loads(json.dumps(source))
    for user in renamed["users"]:
        user["name"] = users[user["name"]]
    for permission in renamed["permissions"]:
        permission["user"] = users[permission["user"]]
    # one more user exactly as committed (empty hash) with every right: it must still not log in
    users["nopassword"] = f"paybus-nopassword-{tag}"
    renamed["users"].append({**source["users"][0], "name": users["nopassword"]})
    renamed["permissions"].append(
        {"user": users["nopassword"], "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
    )
    environ = {set_passwords.variable_for(users[role]): passwords[role] for role in ROLES}
    definitions = set_passwords.fill(renamed, environ, vhost=vhost)
    try:
        import_definitions(definitions, vhost)
        yield Broker(vhost, users, passwords, definitions)
    finally:
        # users are broker-wide: delete each (in parallel: every rabbitmqctl start costs a second)
        cleanups = [
            subprocess.Popen(
                ["rabbitmqctl", "-q", "delete_user", name],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name in users.values()
        ]
        cleanups.append(
            subprocess.Popen(
                ["rabbitmqctl", "-q", "delete_vhost", vhost],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        for process in cleanups:
            process.wait(timeout=60)


@dataclass(frozen=True)
class Cluster:
    prefix: str
    dbname: str

    def role(self, what: str) -> str:
        return f"{self.prefix}_{what}"

    def url(self, what: str, dbname: str | None = None) -> str:
        host = PG_BASE.split("@", 1)[1]
        return f"postgresql://{self.role(what)}@{host}/{dbname or self.dbname}"


def psql(url: str, script: Path, **variables: str) -> None:
    args = ["psql", url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script)]
    for name, value in variables.items():
        args += ["-v", f"{name}={value}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """Roles with unique names (roles are server-wide), a scratch database, real migrations as the owner."""
    tag = unique("t").lower()
    made = Cluster(prefix=tag, dbname=f"{tag}_paybus")
    try:
        psql(f"{PG_BASE}/postgres", ROLES_SQL, prefix=made.prefix, dbname=made.dbname)
        psql(f"{PG_BASE}/postgres", ROLES_SQL, prefix=made.prefix, dbname=made.dbname)  # idempotent
        env = {**os.environ, "DATABASE_URL": made.url("owner"), "PAYBUS_ENV": "development"}
        migrate = subprocess.run(
            [str(Path(sys.executable).parent / "paybus"), "migrate"], env=env, capture_output=True, text=True
        )
        assert migrate.returncode == 0, migrate.stderr
        psql(made.url("owner"), GRANTS_SQL, prefix=made.prefix)
        psql(made.url("owner"), GRANTS_SQL, prefix=made.prefix)  # idempotent
        yield made
    finally:
        with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(made.dbname)))
            for what in ("owner", "processor", "operator", "readonly", "ingress"):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(made.role(what))))
