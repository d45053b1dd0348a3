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

from typing import Any, Final

from processor.events import Event, Handler

# The prefixes of Stripe ids whose rows paybus keeps or derives from: payments, sessions, charges,
# refunds, disputes, invoices, subscriptions, customers. Prices, products and accounts are left out:
# many unrelated events name the same one, and paybus only reads them.
ID_PREFIXES: Final = frozenset({"pi", "cs", "ch", "py", "re", "pyr", "dp", "du", "in", "sub", "cus"})
USER_FIELDS: Final = frozenset({"user_id", "client_reference_id"})


def keys(obj: dict[str, Any]) -> list[str]:
    """The Stripe ids and user ids named anywhere in ``obj`` (nested objects and lists included).

    ``obj`` is decoded JSON, so plain dicts and lists: the checks are on those types (an `isinstance`
    against the `Mapping` ABC cost more than the rest of the walk).
    """
    found: list[str] = []
    stack: list[dict[str, Any]] = [obj]
    while stack:
        for name, value in stack.pop().items():
            if isinstance(value, str):
                if name in USER_FIELDS:
                    found.append("user:" + value)
                else:
                    cut = value.find("_")
                    if 0 < cut <= 3 and value[:cut] in ID_PREFIXES:
                        found.append(value)
            elif isinstance(value, dict):
                stack.append(value)
            elif isinstance(value, list):
                stack.extend(item for item in value if isinstance(item, dict))
    return found


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


def one_new_event(
    indexes: list[int],
    events: list[Event],
    recorded: list[bool],
    handlers: dict[str, Handler],
    handler: Handler,
) -> int | None:
    """The one new event of a chain whose events all go to ``handler``, if it has exactly one (the chains
    a set path takes: `processor.events.subscription_batch`, `invoice_batch`, `customer_batch`)."""
    if not all(handlers.get(events[i].type) is handler for i in indexes):
        return None
    new = [i for i in indexes if recorded[i]]
    return new[0] if len(new) == 1 else None
