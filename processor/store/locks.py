"""Per-object transaction locks, so concurrent deliveries for one Stripe object apply one at a time.

Every handler takes its locks in one global order — the customer first, then its own object, then
the payment keys (sorted) — so two processors can never wait on each other in a cycle. Linking a
customer's orphaned rows (which updates rows without their key locks) happens under the customer's
exclusive lock and after the handler's own key locks, never before them. Locks are
`pg_advisory_xact_lock` on a hash of "kind:id": released at commit or rollback, nothing to clean up,
and they also cover rows that do not exist yet (which `SELECT … FOR UPDATE` cannot), so "insert if
missing" never races into a unique violation. A hash collision only makes two objects wait for
each other, never wrong.

Within one transaction these locks exclude nothing: a batch that applies independent chains of events
side by side on one connection (`processor.chains`) claims every key for its chain (`Claims`), and a
key wanted by two chains stops the batch (`Entangled`) so that it runs again one event after another.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any, Final

from psycopg import AsyncConnection

from processor.statements import send

_EXCLUSIVE: Final = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
# A function scan over unnest() yields the array in order, so the locks are taken in that order.
_MANY: Final = "SELECT pg_advisory_xact_lock(hashtextextended(key, 0)) FROM unnest(%s::text[]) AS key"
_SHARED: Final = "SELECT pg_advisory_xact_lock_shared(hashtextextended(%s, 0))"
_MANY_SHARED: Final = (
    "SELECT pg_advisory_xact_lock_shared(hashtextextended(key, 0)) FROM unnest(%s::text[]) AS key"
)


class Entangled(Exception):
    """Two chains of one batch want the same object: the batch must run its events in order instead."""


class Claims:
    """Which chain of a shared transaction holds each key; shared customer locks may be held by many."""

    def __init__(self) -> None:
        self._exclusive: dict[str, int] = {}  # key -> the chain holding it exclusively
        self._shared: dict[str, set[int]] = {}  # key -> the chains holding it shared

    def claim(self, chain: int, keys: Iterable[str], *, exclusive: bool = True) -> None:
        for key in keys:
            if self._exclusive.get(key, chain) != chain:
                raise Entangled(key)
            if not exclusive:
                self._shared.setdefault(key, set()).add(chain)
            elif self._shared.get(key, set()) - {chain}:
                raise Entangled(key)
            else:
                self._exclusive[key] = chain


# Set by each chain of a shared transaction: the batch's claims and the chain's number.
_CHAIN: ContextVar[tuple[Claims, int] | None] = ContextVar("paybus_chain", default=None)


def enter_chain(claims: Claims, chain: int) -> None:
    """Make the running task chain ``chain`` of the transaction ``claims`` belongs to."""
    _CHAIN.set((claims, chain))


def shared_transaction() -> bool:
    """Whether other chains run in this transaction too (then a savepoint would undo their work)."""
    return _CHAIN.get() is not None


def claim(keys: Iterable[str], *, exclusive: bool = True) -> None:
    """Claim ``keys`` for the running chain, if any; raise `Entangled` if another chain holds one."""
    chain = _CHAIN.get()
    if chain is not None:
        chain[0].claim(chain[1], keys, exclusive=exclusive)


async def lock_customer(conn: AsyncConnection[Any], customer: str | None, *, exclusive: bool = False) -> None:
    """Shared by writers that read the customer's user; exclusive for whoever changes that mapping.

    Linking orphans must see every row written under the old mapping: with the exclusive lock the
    linker waits for in-flight writers to commit, and writers that start later see the new mapping.
    """
    if customer:
        claim([f"cus:{customer}"], exclusive=exclusive)
        await send(conn, _EXCLUSIVE if exclusive else _SHARED, (f"cus:{customer}",))


async def lock_objects(conn: AsyncConnection[Any], *keys: str | None) -> None:
    """Exclusive locks on "kind:id" keys, in sorted order (the order matters: see the module doc)."""
    ordered = sorted({k for k in keys if k})
    claim(ordered)
    if ordered:  # one round trip; the locks are taken one after the other, in array order
        await send(conn, _MANY, (ordered,))


async def lock_keys(conn: AsyncConnection[Any], keys: list[str], *, exclusive: bool = True) -> None:
    """Locks on many keys in one statement, in the order given; claiming them is the caller's part."""
    if keys:
        await send(conn, _MANY if exclusive else _MANY_SHARED, (keys,))


async def lock_chains(
    conn: AsyncConnection[Any], claims: Claims, wanted: list[tuple[int, list[str], list[str]]]
) -> None:
    """For a batch's set-applied chains, each (chain number, its customers, its object keys): claim the
    customers shared and the objects for their chain, then lock every customer (shared) and every object,
    each kind sorted and in one statement: customers first, then objects, as everywhere in this module."""
    customers: set[str] = set()
    objects: set[str] = set()
    for number, named, own in wanted:
        claims.claim(number, [f"cus:{c}" for c in named], exclusive=False)
        claims.claim(number, own)
        customers.update(named)
        objects.update(own)
    await lock_keys(conn, sorted(f"cus:{c}" for c in customers), exclusive=False)
    await lock_keys(conn, sorted(objects))
