"""One Stripe event, one transaction: ledger row + effect, or nothing. Duplicates change nothing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec
import psycopg
from psycopg import AsyncConnection

from processor.context import Context
from processor.errors import Reject
from processor.events import Applied, Event, Handler, decode_event
from processor.statements import send
from processor.users import user_from_object

Result = Literal["applied", "ignored", "stale", "duplicate"]

# Inserting an event already in the ledger returns its id only if the event is to be applied again.
# A dead-lettered event is recorded as `failed` (`_RECORD_FAILED`) so the audit log shows it; a later
# requeue or replay may still apply it, which is why a `failed` row is re-opened instead of skipped.
# So is a row marked by `paybus replay --force` (the mark is cleared in this transaction, so only one
# delivery re-runs the handler); a re-run never downgrades an `applied` outcome.
_REOPEN: Final = """
ON CONFLICT (id) DO UPDATE
   SET outcome = CASE WHEN stripe_events.outcome = 'failed' THEN NULL ELSE stripe_events.outcome END,
       processed_at = CASE WHEN stripe_events.outcome = 'failed' THEN NULL
                           ELSE stripe_events.processed_at END,
       reapply_count = stripe_events.reapply_count + (stripe_events.reapply_requested_at IS NOT NULL)::int,
       reapplied_at = CASE WHEN stripe_events.reapply_requested_at IS NOT NULL THEN now()
                           ELSE stripe_events.reapplied_at END,
       reapply_requested_at = NULL
 WHERE stripe_events.outcome = 'failed' OR stripe_events.reapply_requested_at IS NOT NULL
RETURNING id
"""
_INSERT: Final = (
    """
INSERT INTO stripe_events (id, type, created, livemode, account, api_version, object_id, payload, user_id,
                           received_at)
VALUES (%s, %s, to_timestamp(%s), %s, %s, %s, %s, %s::jsonb, %s::uuid, COALESCE(%s::timestamptz, now()))"""
    + _REOPEN
)
_RECORD_FAILED: Final = """
INSERT INTO stripe_events (id, type, created, livemode, account, api_version, object_id, payload, user_id,
                           outcome, processed_at)
VALUES (%s, %s, to_timestamp(%s), %s, %s, %s, %s, %s::jsonb, %s::uuid, 'failed', now())
ON CONFLICT (id) DO UPDATE SET outcome = 'failed', processed_at = now()
 WHERE stripe_events.outcome IS NULL OR stripe_events.outcome = 'failed'
"""
_FINISH: Final = """
UPDATE stripe_events
   SET outcome = CASE WHEN outcome = 'applied' THEN outcome ELSE %s END,
       user_id = COALESCE(%s, user_id), processed_at = now()
 WHERE id = %s
"""


@contextlib.asynccontextmanager
async def transaction(conn: AsyncConnection[Any]) -> AsyncIterator[None]:
    """The transaction events are applied in, in pipeline mode.

    A statement whose result nobody reads (a lock, an UPDATE, an outbox INSERT) is sent without waiting
    for the server; reading a result (`fetchone`/`fetchall`), a savepoint's end and the COMMIT wait for
    everything sent before them, and raise any error it caused there. So code run in here reads what a
    statement did through its rows (`RETURNING`), never through `rowcount`, which stays -1 until the
    pipeline syncs. Per statement this saves most of a round trip and about half of psycopg's CPU.
    """
    async with conn.pipeline(), conn.transaction():
        yield


def parse_event(body: bytes) -> Event:
    try:
        return decode_event(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise Reject("poison", f"undecodable Stripe event: {str(exc)[:200]}") from None


async def apply_event(
    conn: AsyncConnection[Any],
    body: bytes,
    event: Event,
    handlers: dict[str, Handler],
    ctx: Context,
    received_at: str | None = None,
    *,
    savepoint: bool = True,
    finished: list[tuple[str, str, str | None]] | None = None,
    recorded: bool | None = None,
) -> Result:
    """Insert the ledger row and apply the effect in the caller's transaction.

    ``savepoint=False`` is for batches: any error then aborts the caller's whole transaction, which
    replays its messages one by one (each with its savepoint) instead. With ``finished`` the outcome is
    appended there instead of written, for one `finish_many` per batch. ``recorded`` says that the
    caller has already inserted the ledger row (`record_many`): True if it was new, False if a duplicate.
    """
    if recorded is None:
        try:
            cur = await conn.execute(_INSERT, (*_ledger_row(body, event), received_at))
            recorded = await cur.fetchone() is not None  # a result, not `rowcount`: see `transaction`
        except (psycopg.errors.DataError, psycopg.errors.UntranslatableCharacter, UnicodeDecodeError) as exc:
            raise Reject("poison", f"event cannot be stored: {type(exc).__name__}") from None
    if not recorded:
        return "duplicate"
    handler = handlers.get(event.type)
    if handler is None:
        applied = Applied("ignored")
    else:
        try:
            if savepoint:
                async with conn.transaction():  # a bad payload must not leave a half-applied effect
                    applied = await handler(conn, event, ctx)
            else:
                applied = await handler(conn, event, ctx)
        except (msgspec.ValidationError, psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
            raise Reject("invalid-payload", f"{event.type} payload rejected: {type(exc).__name__}") from None
    if finished is not None:
        finished.append((event.id, applied.outcome, applied.user_id))
    else:
        await send(conn, _FINISH, (applied.outcome, applied.user_id, event.id))
    return applied.outcome


def _ledger_row(body: bytes, event: Event) -> tuple[Any, ...]:
    """The ledger columns known on arrival; the user is the one the object names, if any (the handler's
    may differ or come later, and `finish_many` writes it then)."""
    return (
        event.id,
        event.type,
        event.created,
        event.livemode,
        event.account,
        event.api_version,
        event.object_id,
        body.decode("utf-8"),
        user_from_object(event.data.object),
    )


_INSERT_MANY: Final = (
    """
INSERT INTO stripe_events (id, type, created, livemode, account, api_version, object_id, payload, user_id,
                           received_at)
SELECT v.id, v.type, to_timestamp(v.created), v.livemode, v.account, v.api_version, v.object_id,
       v.payload::jsonb, v.user_id::uuid, COALESCE(v.received_at::timestamptz, now())
  FROM unnest(%b::text[], %b::text[], %b::int8[], %b::bool[], %b::text[], %b::text[], %b::text[], %b::text[],
              %b::text[], %b::text[])
       AS v(id, type, created, livemode, account, api_version, object_id, payload, user_id, received_at)"""
    + _REOPEN
)


async def record_many(conn: AsyncConnection[Any], items: list[tuple[bytes, Event, str | None]]) -> list[bool]:
    """Insert the ledger rows of a batch in one statement; say for each whether it is new.

    The second copy of an event inside one batch is a duplicate of the first (and is not inserted
    again: one INSERT may not touch a row twice). The rows go as binary arrays, so no payload is
    quoted into an array literal.
    """
    first: dict[str, tuple[bytes, Event, str | None]] = {}
    for item in items:
        first.setdefault(item[1].id, item)
    rows = [(*_ledger_row(b, e), r) for b, e, r in first.values()]
    columns = [list(column) for column in zip(*rows, strict=True)]
    cur = await conn.execute(_INSERT_MANY, columns)
    new = {row[0] for row in await cur.fetchall()}
    seen: set[str] = set()
    recorded = []
    for _, event, _ in items:
        recorded.append(event.id in new and event.id not in seen)
        seen.add(event.id)
    return recorded


_FINISH_MANY: Final = """
UPDATE stripe_events e
   SET outcome = CASE WHEN e.outcome = 'applied' THEN e.outcome ELSE v.outcome END,
       user_id = COALESCE(v.user_id, e.user_id), processed_at = now()
  FROM unnest(%s::text[], %s::text[], %s::uuid[]) AS v(id, outcome, user_id)
 WHERE e.id = v.id
"""


async def finish_many(conn: AsyncConnection[Any], finished: list[tuple[str, str, str | None]]) -> None:
    """Record the outcomes of a batch in one statement (the same rule as one `_FINISH` each)."""
    if finished:
        ids, outcomes, users = zip(*finished, strict=True)
        await send(conn, _FINISH_MANY, (list(ids), list(outcomes), list(users)))


async def record_failed(conn: AsyncConnection[Any], body: bytes, event: Event) -> None:
    """Leave a `failed` ledger row for a dead-lettered event (best effort: the dead letter is the record)."""
    try:
        async with conn.transaction():
            await conn.execute(_RECORD_FAILED, _ledger_row(body, event))
    except (psycopg.errors.DataError, psycopg.errors.UntranslatableCharacter, UnicodeDecodeError):
        pass


def now_iso() -> str:
    return datetime.now(UTC).isoformat()
