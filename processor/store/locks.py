"""Per-object transaction locks, so concurrent deliveries for one Stripe object apply one at a time.

Every handler takes its locks in one global order — the customer first, then its own object, then
the payment keys (sorted) — so two processors can never wait on each other in a cycle. Linking a
customer's orphaned rows (which updates rows without their key locks) happens under the customer's
exclusive lock and after the handler's own key locks, never before them. Locks are
`pg_advisory_xact_lock` on a hash of "kind:id": released at commit or rollback, nothing to clean up,
and they also cover rows that do not exist yet (which `SELECT … FOR UPDATE` cannot), so "insert if
missing" never races into a unique violation. A hash collision only makes two objects wait for
each other, never wrong.
"""

from __future__ import annotations

from typing import Any, Final

from psycopg import AsyncConnection

_EXCLUSIVE: Final = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
# A function scan over unnest() yields the array in order, so the locks are taken in that order.
_MANY: Final = "SELECT pg_advisory_xact_lock(hashtextextended(key, 0)) FROM unnest(%s::text[]) AS key"
_SHARED: Final = "SELECT pg_advisory_xact_lock_shared(hashtextextended(%s, 0))"


async def lock_customer(conn: AsyncConnection[Any], customer: str | None, *, exclusive: bool = False) -> None:
    """Shared by writers that read the customer's user; exclusive for whoever changes that mapping.

    Linking orphans must see every row written under the old mapping: with the exclusive lock the
    linker waits for in-flight writers to commit, and writers that start later see the new mapping.
    """
    if customer:
        await conn.execute(_EXCLUSIVE if exclusive else _SHARED, (f"cus:{customer}",))


async def lock_objects(conn: AsyncConnection[Any], *keys: str | None) -> None:
    """Exclusive locks on "kind:id" keys, in sorted order (the order matters: see the module doc)."""
    ordered = sorted({k for k in keys if k})
    if ordered:  # one round trip; the locks are taken one after the other, in array order
        await conn.execute(_MANY, (ordered,))
