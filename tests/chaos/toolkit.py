"""Helpers for the failure, operator-tool and chaos tests: publishing, counting, running `paybus`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
from pamqp.commands import Basic

from shared.amqp import EVENTS_EXCHANGE, declare_topology, topology
from shared.envelope import H_EVENT_ID, H_LIVEMODE, H_RECEIVED_AT

PAYBUS = str(Path(sys.executable).parent / "paybus")


async def declare(amqp_url: str, delays: tuple[int, ...] = (200, 400)) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await declare_topology(await connection.channel(), topology(delays))


async def publish_events(
    amqp_url: str,
    bodies: list[bytes],
    exchange: str = EVENTS_EXCHANGE,
    headers: Mapping[str, Any] | None = None,
    routing_key: str | None = None,
) -> None:
    """Publish raw event bodies the way the ingress does (confirmed, routed by type)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange, ensure=False)
        for body in bodies:
            try:
                envelope = json.loads(body)
                event_id, event_type = envelope["id"], envelope["type"]
            except (ValueError, KeyError, TypeError):
                event_id, event_type = "evt_unreadable", "unknown.unknown"
            message = aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                type=event_type,
                headers={
                    H_EVENT_ID: event_id,
                    H_LIVEMODE: False,
                    H_RECEIVED_AT: "2026-11-26T00:00:00+00:00",
                    **(headers or {}),
                },
            )
            confirmation = await target.publish(
                message, routing_key=routing_key or event_type, mandatory=True
            )
            assert isinstance(confirmation, Basic.Ack), confirmation


async def drain(amqp_url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take (and ack) every message of ``queue``."""
    taken = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
    return taken


def vhost_of(amqp_url: str) -> str:
    return unquote(urlsplit(amqp_url).path.lstrip("/")) or "/"


def queue_totals(amqp_url: str, node: str | None = None) -> dict[str, int]:
    """Messages (ready + unacked) per queue of the URL's vhost, from rabbitmqctl."""
    cmd = [
        "rabbitmqctl",
        "-q",
        *(["-n", node] if node else []),
        "list_queues",
        "-p",
        vhost_of(amqp_url),
        "name",
        "messages",
        "--no-table-headers",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    totals = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            totals[parts[0]] = int(parts[1])
    return totals


async def paybus(*args: str, env: Mapping[str, str], limit: float = 60) -> tuple[int, str, str]:
    """Run the `paybus` CLI as an operator would; return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        PAYBUS,
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), limit)
    return int(proc.returncode or 0), out.decode(), err.decode()
