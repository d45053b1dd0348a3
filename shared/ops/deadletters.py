"""The dead-letter queue as the operator tools see it: scanning without losing, explaining, requeueing.

How the queue is read: every dead letter is taken with basic.get and *manual* acknowledgement and
held, unacked, until the scan ends; only then is each one settled — acked after a confirmed requeue
or on purge, returned (nack, requeue) otherwise. Holding them means no message is seen twice and the
scan ends when the queue answers "empty". If the command dies at any point (Ctrl-C, SIGKILL, network)
the broker returns every unacked message to the queue: nothing is lost; at worst a requeued message
exists twice (in the work queue and still here), and the ledger absorbs the duplicate.

Caveats: returned messages keep their content and headers, but a quorum queue gives back returned
messages ahead of the others, so the order of the dead-letter queue may change; and each return
raises the broker's `x-delivery-count` header, which means nothing here (the queue is declared with a
huge delivery limit so peeking never drops a message on RabbitMQ 4.x). While a scan runs, other
scans see the held messages as absent.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import msgspec

from shared.amqp import DEAD_LETTER_QUEUE
from shared.envelope import H_EVENT_ID
from shared.headers import (
    H_ATTEMPTS,
    H_DEAD_LETTERED,
    H_ERROR,
    H_FIRST_FAILED,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_KEY,
    H_ORIGINAL_QUEUE,
    H_REASON,
    H_REQUEUE_COUNT,
    H_REQUEUED_AT,
)
from shared.logs import redact
from shared.ops.common import iso

if TYPE_CHECKING:  # aio-pika is imported when a command runs: `paybus --help` stays fast
    import aio_pika
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

# Dropped from a requeued copy: the failure record (a fresh start) and what the broker writes.
_FAILURE_HEADERS: Final = frozenset(
    {
        H_ATTEMPTS,
        H_REASON,
        H_ERROR,
        H_FIRST_FAILED,
        H_DEAD_LETTERED,
        H_ORIGINAL_EXCHANGE,
        H_ORIGINAL_KEY,
        H_ORIGINAL_QUEUE,
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
MAX_SCAN: Final = 100_000
GET_TIMEOUT: Final = 10.0


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return iso(value)
    return None if value is None else str(value)


def _when(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = _text(value)
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class _Peek(msgspec.Struct):
    id: str | None = None
    type: str | None = None


class DeadLetter:
    """One dead letter as the operator sees it, with the delivery it came from."""

    def __init__(self, message: AbstractIncomingMessage) -> None:
        self.message = message
        headers = dict(message.headers or {})
        self.headers = headers
        deaths = headers.get("x-death")
        death: dict[str, Any] = (
            deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
        )
        try:
            peek = msgspec.json.decode(message.body, type=_Peek)
        except (msgspec.DecodeError, msgspec.ValidationError):
            peek = _Peek()
        self.event_id = _text(headers.get(H_EVENT_ID)) or peek.id or message.message_id
        self.type = message.type or peek.type or _text(headers.get(H_ORIGINAL_KEY))
        # Ours when paybus dead-lettered it; the broker's (e.g. `delivery_limit`) when RabbitMQ did.
        self.reason = _text(headers.get(H_REASON)) or _text(death.get("reason")) or "unknown"
        attempts = headers.get(H_ATTEMPTS)
        self.attempts = int(attempts) if isinstance(attempts, int) else int(death.get("count") or 0) or None
        self.error = _text(headers.get(H_ERROR))
        self.first_failed_at = _when(headers.get(H_FIRST_FAILED))
        self.dead_lettered_at = (
            _when(headers.get(H_DEAD_LETTERED)) or _when(death.get("time")) or self.first_failed_at
        )
        keys = death.get("routing-keys")
        self.exchange = _text(headers.get(H_ORIGINAL_EXCHANGE))
        self.routing_key = _text(headers.get(H_ORIGINAL_KEY))
        if self.exchange is None:  # dead-lettered by the broker: x-death says where it came from
            self.exchange = _text(death.get("exchange")) or ""
            self.routing_key = _text(keys[0]) if isinstance(keys, list) and keys else self.routing_key
        if not self.exchange and not self.routing_key:  # nowhere known: back to the queue it died in
            self.routing_key = _text(headers.get(H_ORIGINAL_QUEUE)) or _text(death.get("queue"))
        self.queue = _text(headers.get(H_ORIGINAL_QUEUE)) or _text(death.get("queue"))

    def summary(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.type,
            "reason": self.reason,
            "attempts": self.attempts,
            "error": self.error,
            "dead_lettered_at": iso(self.dead_lettered_at) if self.dead_lettered_at else None,
            "first_failed_at": iso(self.first_failed_at) if self.first_failed_at else None,
            "original_exchange": self.exchange,
            "original_routing_key": self.routing_key,
            "original_queue": self.queue,
        }

    def body_text(self, raw: bool = False) -> str:
        try:
            text = json.dumps(json.loads(self.message.body), indent=2, ensure_ascii=False)
        except (ValueError, UnicodeDecodeError):
            text = self.message.body.decode("utf-8", "replace")
        return text if raw else redact(text)

    def requeue_message(self, now: datetime) -> aio_pika.Message:
        """The original message again: same body and properties, attempts reset, requeue stamped."""
        from shared.amqp import copy_message

        headers = {k: v for k, v in self.headers.items() if k not in _FAILURE_HEADERS}
        headers[H_REQUEUED_AT] = iso(now)
        previous = self.headers.get(H_REQUEUE_COUNT)
        headers[H_REQUEUE_COUNT] = (previous if isinstance(previous, int) else 0) + 1
        return copy_message(self.message, headers)


class Filters(msgspec.Struct, frozen=True):
    ids: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    since: datetime | None = None
    user_id: str | None = None

    def __call__(self, letter: DeadLetter) -> bool:
        if self.ids and letter.event_id not in self.ids:
            return False
        if self.types and not any(fnmatch.fnmatchcase(letter.type or "", t) for t in self.types):
            return False
        if self.reasons and letter.reason not in self.reasons:
            return False
        if self.since and (letter.dead_lettered_at is None or letter.dead_lettered_at < self.since):
            return False
        return not (self.user_id and self.user_id.encode() not in letter.message.body)


class Scan:
    """Dead letters held unacked on one channel; ``settle`` returns every one not acked meanwhile."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.held: list[DeadLetter] = []
        self.selected: list[DeadLetter] = []
        self._settled: set[int] = set()

    async def run(
        self, select: Callable[[DeadLetter], bool], limit: int | None, max_scan: int = MAX_SCAN
    ) -> None:
        queue = await self.channel.get_queue(DEAD_LETTER_QUEUE, ensure=True)
        while len(self.held) < max_scan and (limit is None or len(self.selected) < limit):
            message = await queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT)
            if message is None:
                break
            letter = DeadLetter(message)
            self.held.append(letter)
            if select(letter):
                self.selected.append(letter)

    async def ack(self, letter: DeadLetter) -> None:
        await letter.message.ack()
        self._settled.add(id(letter))

    async def settle(self) -> None:
        """Give back, in their original order, the messages that were not acked."""
        if self.channel.is_closed:
            return  # the broker has already returned every unacked message
        for letter in self.held:
            if id(letter) not in self._settled:
                await letter.message.nack(requeue=True)
                self._settled.add(id(letter))


async def open_channel(url: str) -> tuple[aio_pika.abc.AbstractConnection, AbstractChannel]:
    import aio_pika

    connection = await aio_pika.connect(url, client_properties={"connection_name": "paybus-dlq"}, timeout=10)
    channel = await connection.channel(publisher_confirms=True)
    return connection, channel


async def requeue_one(channel: AbstractChannel, letter: DeadLetter, now: datetime) -> str | None:
    """Publish ``letter`` to its original exchange and key with a confirm; return an error or None."""
    from pamqp.commands import Basic

    if letter.routing_key is None:
        return "original exchange and routing key unknown"
    exchange = (
        channel.default_exchange
        if not letter.exchange
        else await channel.get_exchange(letter.exchange, ensure=False)
    )
    try:
        confirmation = await exchange.publish(
            letter.requeue_message(now), routing_key=letter.routing_key, mandatory=True, timeout=10
        )
    except Exception as exc:  # nack, timeout, closed channel: the dead letter stays
        return f"publish failed ({type(exc).__name__})"
    if not isinstance(confirmation, Basic.Ack):
        return f"no queue is bound to {letter.exchange or '(default)'} with key {letter.routing_key!r}"
    return None


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value
