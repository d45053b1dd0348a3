"""The ordering guard (DESIGN §9.2): whether an event may overwrite an object's stored state.

Stripe does not order deliveries and `created` has one-second resolution. Every object row stores
the key of the event that last set its state: (terminal, created, rank). An event applies when its
key is strictly greater, compared as a tuple:

1. a terminal state is never replaced by a non-terminal one, whatever the times say;
2. otherwise the newer event (`created`) wins — this is what makes `failed → succeeded` after a retry
   and a subscription's `past_due → active` recovery work;
3. on a same-second tie the later lifecycle step (rank) wins; equal keys mean "same information",
   the event is stale and changes nothing.

Rank tables live beside each family's handler; every status gets a distinct rank so ties resolve
the same way whatever the arrival order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple


class Key(NamedTuple):
    terminal: bool
    created: int
    rank: int


def key_of(status: str, created: int, ranks: Mapping[str, int], terminal: frozenset[str]) -> Key:
    return Key(status in terminal, created, ranks.get(status, -1))


def stored_key(status: str | None, created: int | None, rank: int | None, terminal: frozenset[str]) -> Key:
    if status is None:
        return Key(False, -1, -1)
    return Key(status in terminal, -1 if created is None else created, -1 if rank is None else rank)


def wins(new: Key, stored: Key) -> bool:
    return new > stored
