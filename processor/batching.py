"""Several event messages in one transaction: fewer BEGIN/COMMIT round trips and pool checkouts.

Each delivery task hands its message to the batcher and waits for its own result, so the consumer's
ack-after-commit, retry and dead-letter logic stays per message. One batch runs at a time: messages
that arrive while it runs wait and form the next one, so under load batches fill by themselves (a
backlog drains in full batches) and an idle processor answers a lone webhook after a 2 ms linger.
One batch at a time also means batches never wait on each other's row locks; in a run of many small
concurrent batches they did, and the drain was three times slower (tests/bench/README.md).

Inside the transaction the batch is split into chains (`processor.chains`): events naming a common
object or user are applied one after the other, in delivery order, and the chains side by side, so
their statements share round trips. If two chains reach the same object all the same (a refund that
names only its charge), the batch stops and runs again with every event in order (`Entangled`).
Before the chains run, those made only of one PaymentIntent's events and its charges' events are
applied as sets (`processor.events.intent_batch`): a few statements for all of them instead of ~4 per
event; so are those whose one new event is a subscription's (`processor.events.subscription_batch`), an
invoice's (`processor.events.invoice_batch`) or a customer's (`processor.events.customer_batch`).

A batch commits as a whole; if any message in it fails (poison, bad payload, lock conflict, bug), the
batch rolls back and every message is processed alone in its own transaction, where the failure
belongs to the one message that caused it. Nothing is acked before the COMMIT that holds its effect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, Final

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import context, trace
from opentelemetry.trace import Link, SpanKind

from processor import outbox
from processor.chains import split
from processor.consumer import DB_DOWN_ERRORS
from processor.events import Event, customer_batch, intent_batch, invoice_batch, subscription_batch
from processor.ledger import Result, apply_event, finish_many, parse_event, record_many, transaction
from processor.pipeline import EventPipeline, received_at_of
from processor.schema import unknown_schema
from processor.store.locks import Claims, Entangled, enter_chain
from shared.telemetry import extract

MAX_BATCH: Final = 200
# How long the first message after an idle spell waits for company; later batches form while the
# previous one runs and do not wait.
LINGER_SECONDS: Final = 0.002


_Pending = tuple[AbstractIncomingMessage, trace.Span, "asyncio.Future[Result]"]


class _Alone(Exception):
    """The batch failed: process this message in a transaction of its own."""


class EventBatcher:
    """The work function for the event `Consumer`: batches messages into shared transactions."""

    def __init__(
        self, pipeline: EventPipeline, max_batch: int = MAX_BATCH, linger: float = LINGER_SECONDS
    ) -> None:
        self._pipeline = pipeline
        self._max = max_batch
        self._linger = linger
        self._pending: list[_Pending] = []
        self._runner: asyncio.Task[None] | None = None
        self.batches = 0  # batches applied in a shared transaction
        self.entangled = 0  # of those, how many two chains met in, and were applied again in order
        self.intent_chains = 0  # PaymentIntent chains applied as sets (`processor.events.intent_batch`)
        self.subscription_chains = 0  # subscription events applied as sets (`...subscription_batch`)
        self.invoice_chains = 0  # invoice events applied as sets (`processor.events.invoice_batch`)
        self.customer_chains = 0  # customer events applied as sets (`processor.events.customer_batch`)

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        token = context.attach(extract(message.headers))
        try:
            with self._pipeline.tracer.start_as_current_span(
                f"process {message.type or 'event'}", kind=SpanKind.CONSUMER
            ) as span:
                span.set_attributes(
                    {"messaging.system": "rabbitmq", "messaging.destination.name": message.routing_key or ""}
                )
                future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
                self._pending.append((message, span, future))
                if self._runner is None or self._runner.done():
                    self._runner = asyncio.create_task(self._drain())
                try:
                    await future
                except _Alone:
                    await self._pipeline.process(message.body, received_at_of(message))
        finally:
            context.detach(token)

    async def _drain(self) -> None:
        """Run batches one after another while messages wait; those arriving meanwhile form the next."""
        if len(self._pending) < self._max:
            await asyncio.sleep(self._linger)  # deliveries already on the wire join the first batch
        while self._pending:
            batch, self._pending = self._pending[: self._max], self._pending[self._max :]
            await self._run(batch)

    async def _run(
        self, batch: list[tuple[AbstractIncomingMessage, trace.Span, asyncio.Future[Result]]]
    ) -> None:
        try:
            results = await self._apply(batch)
        except DB_DOWN_ERRORS as exc:
            for _, _, future in batch:  # the consumer pauses and retries each message
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(_Alone())
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _apply(self, batch: list[_Pending]) -> list[Result]:
        if len(batch) == 1:
            raise _Alone()  # nothing to share: the single-message path is the same work with a savepoint
        started = time.perf_counter()
        items = []
        for message, span, _ in batch:
            event = parse_event(message.body)  # Reject: the batch falls back and the message is judged alone
            if unknown_schema(event.api_version):
                raise _Alone()
            span.set_attributes({"stripe.event_id": event.id, "stripe.event_type": event.type})
            items.append((message, event))
        pipeline = self._pipeline
        parent = trace.set_span_in_context(batch[0][1])
        links = [Link(span.get_span_context()) for _, span, _ in batch[1:]]
        with pipeline.tracer.start_as_current_span(
            "db apply_batch", context=parent, kind=SpanKind.CLIENT, links=links
        ) as db_span:
            chains = split([event for _, event in items])
            db_span.set_attributes(
                {"db.system": "postgresql", "paybus.batch_size": len(batch), "paybus.chains": len(chains)}
            )
            self.batches += 1
            try:
                results = await self._transact(items, chains)
            except Entangled as exc:
                self.entangled += 1
                db_span.add_event("entangled", {"paybus.key_kind": str(exc).split(":", 1)[0]})
                results = await self._transact(items, [list(range(len(items)))])
        elapsed = (time.perf_counter() - started) / len(items)
        for (message, event), result in zip(items, results, strict=True):
            pipeline.observe(event.type, result, elapsed, received_at_of(message))
        return results

    async def _transact(
        self, items: list[tuple[AbstractIncomingMessage, Event]], chains: list[list[int]]
    ) -> list[Result]:
        """Apply the batch in one transaction, its chains side by side (each chain's events in order).

        The batch's ledger outcomes and outbox rows are written once, after every chain has run.
        """
        pipeline = self._pipeline
        finished: list[tuple[str, str, str | None]] = []
        by_index: dict[int, Result] = {}
        async with pipeline.pool.connection() as conn, transaction(conn):
            recorded = await record_many(
                conn, [(message.body, event, received_at_of(message)) for message, event in items]
            )

            async def chain(indexes: list[int], claims: Claims | None = None, number: int = 0) -> None:
                if claims is not None:
                    enter_chain(claims, number)  # this chain's own task: the mark ends with it
                for i in indexes:
                    message, event = items[i]
                    by_index[i] = await apply_event(
                        conn,
                        message.body,
                        event,
                        pipeline.handlers,
                        pipeline.ctx,
                        savepoint=False,
                        finished=finished,
                        recorded=recorded[i],
                    )

            with outbox.held() as emitted:  # the chains' tasks start inside: they share this list
                claims = Claims()
                events = [event for _, event in items]
                taken, applied = await intent_batch.apply_chains(
                    conn, events, recorded, chains, pipeline.handlers, pipeline.ctx, claims
                )
                self.intent_chains += len(taken)
                # the single-event set paths, each leaving alone the chains an earlier one took
                counts = [0, 0, 0]
                for n, path in enumerate((subscription_batch, invoice_batch, customer_batch)):
                    more, results = await path.apply_chains(
                        conn, events, recorded, chains, pipeline.handlers, pipeline.ctx, claims, taken
                    )
                    counts[n] = len(more)
                    taken |= more
                    applied.update(results)
                self.subscription_chains += counts[0]
                self.invoice_chains += counts[1]
                self.customer_chains += counts[2]
                for i, result in applied.items():
                    finished.append((items[i][1].id, result.outcome, result.user_id))
                    by_index[i] = result.outcome
                for n in taken:
                    by_index.update((i, "duplicate") for i in chains[n] if not recorded[i])
                rest = [(n, indexes) for n, indexes in enumerate(chains) if n not in taken]
                if len(chains) == 1 and rest:
                    await chain(chains[0])
                elif rest:
                    await _together([chain(indexes, claims, n) for n, indexes in rest])
            await outbox.write_held(conn, emitted)
            await finish_many(conn, finished)
        return [by_index[i] for i in range(len(items))]

    async def close(self) -> None:
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)


async def _together(work: list[Coroutine[Any, Any, None]]) -> None:
    """Run chains side by side, each in its own task; when all have ended, raise the first failure.

    None is cancelled: a chain stopped halfway through a statement would leave the shared connection
    in an unknown state. A failed statement aborts the transaction, so the others fail fast too. A
    lost database wins over other failures (the consumer then pauses instead of judging messages).
    """
    outcomes = await asyncio.gather(*work, return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        raise next((f for f in failures if isinstance(f, DB_DOWN_ERRORS)), failures[0])
