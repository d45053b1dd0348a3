"""deploy/rabbitmq/definitions.json and the code declare the same topology, and declaring is idempotent."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import aio_pika

from shared.amqp import declare_topology, definitions
from tests.support import REPO, rabbitmqctl, wait_for_sync

DEFINITIONS = REPO / "deploy" / "rabbitmq" / "definitions.json"


def _snapshot(vhost: str) -> dict[str, Any]:
    def rows(*args: str) -> list[dict[str, Any]]:
        return [
            json.loads(line) for line in [rabbitmqctl(*args, "-p", vhost, "--formatter", "json")] if line
        ][0]

    exchanges = {
        (e["name"], e["type"], e["durable"], json.dumps(e["arguments"], sort_keys=True))
        for e in rows("list_exchanges", "name", "type", "durable", "arguments")
        if e["name"] and not e["name"].startswith("amq.")
    }
    queues = {
        # arguments come as [name, amqp-type, value]; the integer width differs between an import and a
        # client declaration, so compare names and values only
        (q["name"], q["durable"], json.dumps(sorted((a[0], a[-1]) for a in q["arguments"])))
        for q in rows("list_queues", "name", "durable", "arguments")
    }
    bindings = {
        (b["source_name"], b["destination_name"], b["routing_key"])
        for b in rows("list_bindings", "source_name", "destination_name", "routing_key")
        if b["source_name"]  # the default exchange's implicit bindings
    }
    return {"exchanges": exchanges, "queues": queues, "bindings": bindings}


def _vhost_name(amqp_url: str) -> str:
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(amqp_url).path.lstrip("/"))


def test_definitions_file_is_generated_from_the_code() -> None:
    on_disk = json.loads(DEFINITIONS.read_text())
    generated = definitions()
    for kind in ("exchanges", "queues", "bindings"):
        assert on_disk[kind] == generated[kind], f"{kind} in {DEFINITIONS.name} drifted from shared/amqp.py"


async def test_imported_definitions_equal_what_the_code_declares(make_vhost: Callable[[], str]) -> None:
    declared_url, imported_url = make_vhost(), make_vhost()
    connection = await aio_pika.connect(declared_url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel)
        await declare_topology(channel)  # idempotent: a second run changes nothing and does not fail

    imported = _vhost_name(imported_url)
    data = json.loads(DEFINITIONS.read_text())
    for kind in ("exchanges", "queues", "bindings"):
        for item in data[kind]:
            item["vhost"] = imported
    data["vhosts"] = [{"name": imported}]
    # the broker itself reads the file, as its own user: pytest's tmp_path (mode 0700) is out of its reach
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir="/tmp", delete=False) as handle:
        handle.write(json.dumps(data))
    os.chmod(handle.name, 0o644)
    try:
        rabbitmqctl("import_definitions", handle.name)
    finally:
        os.unlink(handle.name)

    expected = _snapshot(_vhost_name(declared_url))
    assert len(expected["queues"]) == len(definitions()["queues"]) and len(expected["exchanges"]) == 6
    # import_definitions is asynchronous: wait until the imported vhost has everything
    wait_for_sync(lambda: _snapshot(imported) == expected, timeout=30, interval=0.3)
