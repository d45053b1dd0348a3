"""A batch split into chains: events that may touch the same rows share a chain, chains share nothing.

The events of one chain are applied one after the other, in batch order; different chains are applied
side by side on the batch's one connection, so their statements share round trips to Postgres (in
pipeline mode, one wait for a result brings back the results of every statement sent before it).

Two events share a chain when their objects name a common Stripe object or user (`keys`), directly or
through other events of the batch. That is a forecast: an event may reach rows it does not name (a
refund that names only its charge settles the charge's payment). What makes side by side safe is
`processor.store.locks.Claims`: every object lock a chain takes is claimed for it, and a key claimed
by two chains stops the batch, which then runs again one event after another.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

from processor.events import Event

# The prefixes of Stripe ids whose rows paybus keeps or derives from: payments, sessions, charges,
# refunds, disputes, invoices, subscriptions, customers. Prices, products and accounts are left out:
# many unrelated events name the same one, and paybus only reads them.
ID_PREFIXES: Final = frozenset({"pi", "cs", "ch", "py", "re", "pyr", "dp", "du", "in", "sub", "cus"})
USER_FIELDS: Final = frozenset({"user_id", "client_reference_id"})


def keys(obj: Mapping[str, Any]) -> Iterator[str]:
    """The Stripe ids and user ids named anywhere in ``obj`` (nested objects and lists included)."""
    for name, value in obj.items():
        if isinstance(value, str):
            if name in USER_FIELDS:
                yield "user:" + value
            else:
                cut = value.find("_")
                if 0 < cut <= 3 and value[:cut] in ID_PREFIXES:
                    yield value
        elif isinstance(value, Mapping):
            yield from keys(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    yield from keys(item)


def split(events: list[Event]) -> list[list[int]]:
    """The chains of ``events``, as lists of indexes in batch order, ordered by their first event."""
    parent = list(range(len(events)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}  # key -> the first event naming it
    for index, event in enumerate(events):
        for key in keys(event.data.object):
            other = first.setdefault(key, index)
            a, b = root(other), root(index)
            if a != b:
                parent[max(a, b)] = min(a, b)
    chains: dict[int, list[int]] = {}
    for index in range(len(events)):
        chains.setdefault(root(index), []).append(index)
    return list(chains.values())
