"""The `payment_requests` rows: claim a key, lock it while Stripe is called, store the final reply."""

from __future__ import annotations

from typing import Any, Final

import msgspec
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from shared.messages import Reply

# The claim commits on its own (autocommit), before any lock is taken: a concurrent duplicate's
# INSERT then finds a committed row and does nothing, instead of waiting on an open transaction.
_CLAIM: Final = """
INSERT INTO payment_requests (idempotency_key, kind, user_id, params_hash, request)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (idempotency_key) DO NOTHING
"""
_PEEK: Final = "SELECT kind, params_hash, status, response FROM payment_requests WHERE idempotency_key = %s"
# A duplicate waits here until the delivery holding the lock commits, then reads the stored reply.
# The wait is bounded: past it the duplicate goes back to the retry tiers.
_LOCK_TIMEOUT: Final = "SELECT set_config('lock_timeout', %s, true)"
_LOCK: Final = _PEEK + " FOR UPDATE"
_FINISH: Final = """
UPDATE payment_requests SET status = %s, response = %s, stripe_object_id = %s, updated_at = now()
 WHERE idempotency_key = %s
RETURNING response
"""


class Row(msgspec.Struct, frozen=True):
    kind: str
    params_hash: str
    status: str
    response: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        return self.status != "pending" and self.response is not None

    def reply(self) -> Reply:
        return msgspec.convert(self.response, Reply)


async def claim(
    conn: AsyncConnection[Any], key: str, kind: str, user_id: str, params_hash: str, request: dict[str, Any]
) -> None:
    await conn.execute(_CLAIM, (key, kind, user_id, params_hash, Jsonb(request)))


async def peek(conn: AsyncConnection[Any], key: str) -> Row | None:
    row = await (await conn.execute(_PEEK, (key,))).fetchone()
    return Row(*row) if row else None


async def lock(conn: AsyncConnection[Any], key: str, timeout_s: float) -> Row | None:
    """Lock the row for this transaction; LockNotAvailable if another holds it past the timeout."""
    await conn.execute(_LOCK_TIMEOUT, (f"{int(timeout_s * 1000)}ms",))
    row = await (await conn.execute(_LOCK, (key,))).fetchone()
    return Row(*row) if row else None


async def finish(conn: AsyncConnection[Any], key: str, reply: Reply, stripe_object_id: str | None) -> Reply:
    """Store the final reply; returns it as stored, so the first answer is byte-identical to every repeat."""
    status = "succeeded" if reply.ok else "failed"
    cur = await conn.execute(_FINISH, (status, Jsonb(msgspec.to_builtins(reply)), stripe_object_id, key))
    row = await cur.fetchone()
    assert row is not None
    return msgspec.convert(row[0], Reply)
