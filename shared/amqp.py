"""RabbitMQ names and topology (DESIGN §5), declared idempotently from this one description."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

EVENTS_EXCHANGE: Final = "stripe.events"
EVENTS_QUEUE: Final = "paybus.stripe-events"
REQUESTS_EXCHANGE: Final = "paybus.requests"
REQUESTS_UNROUTED_EXCHANGE: Final = "paybus.requests.unrouted"
REQUESTS_QUEUE: Final = "paybus.payment-requests"
RETRY_EXCHANGE: Final = "paybus.retry"
DEAD_LETTER_EXCHANGE: Final = "paybus.dead-letter"
DEAD_LETTER_QUEUE: Final = "paybus.dead-letter"
DOMAIN_EXCHANGE: Final = "paybus.events"

REQUEST_KINDS: Final = (
    "checkout_session.create",
    "payment_intent.create",
    "refund.create",
    "portal_session.create",
    "subscription.cancel",
    "subscription.change",
)

# Broker-side safety net: a message that kills its consumer this many times is dead-lettered by
# RabbitMQ itself (reason "delivery_limit") instead of crash-looping the processor forever.
DELIVERY_LIMIT: Final = 20
DEFAULT_RETRY_DELAYS_MS: Final = (1_000, 5_000, 30_000, 120_000, 600_000)
# Jitter without per-message TTL: each tier is a few delay queues whose queue-level TTLs spread around
# the tier's delay, and a failed message picks one at random. Per-message `expiration` would give true
# random jitter but quorum queues only expire messages at the head, so one long TTL would hold back
# every shorter one behind it (head-of-line blocking); uniform TTLs per queue cannot block each other.
RETRY_JITTER: Final = (0.8, 1.0, 1.2)
# The dead-letter queue is only ever read by `paybus dlq`, which peeks by taking messages and returning
# them. Before RabbitMQ 4.3 every return counts as a delivery, and from 4.0 quorum queues default to a
# delivery limit of 20 after which a message without a dead-letter exchange is *dropped*: a large
# explicit limit keeps dead letters from vanishing after twenty `dlq list` runs.
DEAD_LETTER_DELIVERY_LIMIT: Final = 1_000_000_000


class Exchange(msgspec.Struct, frozen=True):
    name: str
    type: str
    arguments: dict[str, Any] = {}


class Queue(msgspec.Struct, frozen=True):
    name: str
    arguments: dict[str, Any]


class Binding(msgspec.Struct, frozen=True):
    source: str
    destination: str
    routing_key: str


class Topology(msgspec.Struct, frozen=True):
    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]
    bindings: tuple[Binding, ...]


def copy_message(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """The same body and properties, persistent, with ``headers``: for retries, dead letters, requeues."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


def retry_queue_name(work_queue: str, delay_ms: int) -> str:
    """The delay queue holding messages of ``work_queue`` for ``delay_ms`` before they return."""
    return f"paybus.retry.{work_queue.removeprefix('paybus.')}.{delay_ms}ms"


def retry_tiers(retry_delays_ms: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """For each configured delay, the delays of its jittered queues (distinct, in milliseconds)."""
    return tuple(tuple(sorted({max(1, round(delay * f)) for f in RETRY_JITTER})) for delay in retry_delays_ms)


def _work_queue_arguments() -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": DELIVERY_LIMIT,
    }


def topology(retry_delays_ms: Sequence[int] = DEFAULT_RETRY_DELAYS_MS) -> Topology:
    """Everything paybus declares; ``deploy/rabbitmq/definitions.json`` is this with the defaults."""
    exchanges = [
        Exchange(EVENTS_EXCHANGE, "topic"),
        Exchange(REQUESTS_UNROUTED_EXCHANGE, "fanout"),
        # Unknown request kinds still reach the processor (via the alternate exchange) and get an
        # `invalid_request` reply instead of vanishing as unroutable.
        Exchange(REQUESTS_EXCHANGE, "direct", {"alternate-exchange": REQUESTS_UNROUTED_EXCHANGE}),
        Exchange(RETRY_EXCHANGE, "direct"),
        Exchange(DEAD_LETTER_EXCHANGE, "fanout"),
        Exchange(DOMAIN_EXCHANGE, "topic"),
    ]
    queues = [
        Queue(EVENTS_QUEUE, _work_queue_arguments()),
        Queue(REQUESTS_QUEUE, _work_queue_arguments()),
        Queue(DEAD_LETTER_QUEUE, {"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT}),
    ]
    bindings = [
        Binding(EVENTS_EXCHANGE, EVENTS_QUEUE, "#"),
        *(Binding(REQUESTS_EXCHANGE, REQUESTS_QUEUE, kind) for kind in REQUEST_KINDS),
        Binding(REQUESTS_UNROUTED_EXCHANGE, REQUESTS_QUEUE, ""),
        Binding(DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, ""),
    ]
    delays = sorted({delay for tier in retry_tiers(retry_delays_ms) for delay in tier})
    for work_queue in (EVENTS_QUEUE, REQUESTS_QUEUE):
        for delay in delays:
            name = retry_queue_name(work_queue, delay)
            # A delay queue has no consumer: its TTL expires the message back to the work queue
            # through the default exchange, so the original exchange and routing key are untouched.
            queues.append(
                Queue(
                    name,
                    {
                        "x-queue-type": "quorum",
                        "x-message-ttl": delay,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": work_queue,
                        "x-dead-letter-strategy": "at-least-once",
                        "x-overflow": "reject-publish",
                    },
                )
            )
            bindings.append(Binding(RETRY_EXCHANGE, name, name))
    return Topology(tuple(exchanges), tuple(queues), tuple(bindings))


async def declare_topology(channel: AbstractChannel, topo: Topology | None = None) -> None:
    """Declare every exchange, queue and binding; safe to run any number of times."""
    topo = topo or topology()
    exchanges = {}
    for ex in topo.exchanges:
        exchanges[ex.name] = await channel.declare_exchange(
            ex.name, aio_pika.ExchangeType(ex.type), durable=True, arguments=ex.arguments or None
        )
    queues = {}
    for q in topo.queues:
        queues[q.name] = await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
    for b in topo.bindings:
        await queues[b.destination].bind(exchanges[b.source], routing_key=b.routing_key)


def definitions(topo: Topology | None = None, vhost: str = "/") -> dict[str, Any]:
    """The topology in RabbitMQ's definitions format (``rabbitmqctl import_definitions``)."""
    topo = topo or topology()
    return {
        "exchanges": [
            {
                "name": ex.name,
                "vhost": vhost,
                "type": ex.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": ex.arguments,
            }
            for ex in topo.exchanges
        ],
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": q.arguments}
            for q in topo.queues
        ],
        "bindings": [
            {
                "source": b.source,
                "vhost": vhost,
                "destination": b.destination,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in topo.bindings
        ],
    }
