"""A batch's PaymentIntent chains applied as sets: a few statements per batch instead of ~4 per event.

Most of a shop's events are payment_intent.*, and the per-event path (`payments.on_payment_intent`)
waits on Postgres twice for each one: for the payment row under its lock, and for the row as written.
Here every chain of a batch (`processor.chains`) whose events all concern one PaymentIntent and nothing
else is applied at once: the locks of all such chains are taken and their payment rows read in one
round trip; each chain's events are applied to its row in memory, in order, by the same rules
(`payments.changes_to`, `payment_effects`, `entitlements`); and the new rows, the changed rows and the
new grants are written with one statement each. What each event produces (its outcome, the row, the
entitlements, the outbox events) is what the per-event path produces.

A chain is left to the per-event path when what it needs is not all in hand: a new payment for which
charges, refunds or disputes are already stored (`payment_effects.settle` folds them in), or a payment
that was already succeeded when it was reached (its entitlement rows would have to be read).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from processor import entitlements
from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.events.payments import event_time, intent_update, on_payment_intent
from processor.outbox import emit
from processor.statements import send
from processor.store import payment_effects
from processor.store.locks import Claims, lock_keys
from processor.store.payments import PaymentUpdate, changes_to, new_row
from shared.domain_events import DomainEvent

_ROWS: Final = "SELECT * FROM payments WHERE stripe_payment_intent_id = ANY(%s) FOR UPDATE"
# PaymentIntents whose charges, refunds or disputes are already stored (see the module doc).
_RELATED: Final = """
SELECT stripe_payment_intent_id FROM charges WHERE stripe_payment_intent_id = ANY(%(pi)s)
UNION SELECT stripe_payment_intent_id FROM refunds WHERE stripe_payment_intent_id = ANY(%(pi)s)
UNION SELECT stripe_payment_intent_id FROM disputes WHERE stripe_payment_intent_id = ANY(%(pi)s)
"""
_USERS: Final = (
    "SELECT stripe_customer_id, user_id::text FROM stripe_customers WHERE stripe_customer_id = ANY(%s)"
)
_COLUMNS: Final = """unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
                %b::int8[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
                %b::int8[], %b::int8[], %b::timestamptz[])
       AS v(id, user_id, intent, session, customer, subscription_id, amount, mode, currency, status,
            product, last_error, metadata, created, rank, paid_at)"""
_INSERT: Final = f"""
INSERT INTO payments (id, user_id, stripe_payment_intent_id, stripe_checkout_session_id, stripe_customer_id,
                      subscription_id, amount, mode, currency, status, product, last_error, metadata,
                      status_event_created, status_rank, paid_at)
SELECT v.id::uuid, v.user_id::uuid, v.intent, v.session, v.customer, v.subscription_id, v.amount, v.mode,
       v.currency, v.status, v.product, v.last_error, v.metadata::jsonb, v.created, v.rank, v.paid_at
  FROM {_COLUMNS}
"""
_UPDATE: Final = f"""
UPDATE payments p
   SET user_id = v.user_id::uuid, stripe_customer_id = v.customer, subscription_id = v.subscription_id,
       amount = v.amount, mode = v.mode, currency = v.currency, status = v.status, product = v.product,
       last_error = v.last_error, metadata = v.metadata::jsonb, status_event_created = v.created,
       status_rank = v.rank, paid_at = v.paid_at, updated_at = now()
  FROM {_COLUMNS}
 WHERE p.id = v.id::uuid
"""


@dataclass
class _Chain:
    number: int  # its place in the batch's chains (the `Claims` of the batch know it by this)
    indexes: list[int]  # its events' places in the batch, in order
    intent: str
    row: dict[str, Any] | None = None  # the payment row, as the chain's events leave it
    new: bool = False
    results: dict[int, Applied] = field(default_factory=dict)
    announced: list[DomainEvent] = field(default_factory=list)
    grants: list[entitlements.GrantRow] = field(default_factory=list)


def _intent_of(events: list[Event], indexes: list[int], handlers: dict[str, Handler]) -> str | None:
    """The one PaymentIntent the chain's events are all about, if they are all payment_intent.*."""
    intent = events[indexes[0]].object_id
    for i in indexes:
        event = events[i]
        if handlers.get(event.type) is not on_payment_intent or event.object_id != intent:
            return None
    return intent


async def apply_chains(
    conn: AsyncConnection[Any],
    events: list[Event],
    recorded: list[bool],
    chains: list[list[int]],
    handlers: dict[str, Handler],
    ctx: Context,
    claims: Claims,
) -> tuple[set[int], dict[int, Applied]]:
    """Apply the PaymentIntent chains of a batch; return which chains it took, and their events' results.

    Only events ``recorded`` as new are applied (the others are duplicates). Chains not taken are left,
    untouched, to the per-event path; the locks this took for them stay held, which changes nothing.
    """
    candidates = []
    for number, indexes in enumerate(chains):
        intent = _intent_of(events, indexes, handlers)
        if intent and any(recorded[i] for i in indexes):
            candidates.append(_Chain(number, [i for i in indexes if recorded[i]], intent))
    if not candidates:
        return set(), {}
    updates = {i: intent_update(events[i]) for chain in candidates for i in chain.indexes}  # payloads first
    customers = {}
    for chain in candidates:
        named = sorted({c for i in chain.indexes if (c := updates[i].stripe_customer_id)})
        claims.claim(chain.number, [f"cus:{c}" for c in named], exclusive=False)
        claims.claim(chain.number, [f"pi:{chain.intent}"])
        customers.update(dict.fromkeys(named))
    intents = sorted(chain.intent for chain in candidates)
    # Customers first, then the PaymentIntents: the order of `processor.store.locks`.
    await lock_keys(conn, sorted(f"cus:{c}" for c in customers), exclusive=False)
    await lock_keys(conn, [f"pi:{i}" for i in intents])
    rows_cur = await conn.cursor(row_factory=dict_row).execute(_ROWS, (intents,))
    related_cur = await conn.cursor().execute(_RELATED, {"pi": intents})
    unnamed = sorted(
        {u.stripe_customer_id for u in updates.values() if u.user_id is None and u.stripe_customer_id}
    )
    users_cur = await conn.cursor().execute(_USERS, (unnamed,)) if unnamed else None
    rows = {row["stripe_payment_intent_id"]: row for row in await rows_cur.fetchall()}
    related = {intent for (intent,) in await related_cur.fetchall()}
    users = dict(await users_cur.fetchall()) if users_cur else {}

    taken = []
    for chain in candidates:
        chain.row = rows.get(chain.intent)
        if chain.row is None and chain.intent in related:
            continue
        if _replay(chain, events, updates, users, ctx):
            taken.append(chain)
    await _write(conn, taken)
    results: dict[int, Applied] = {}
    for chain in taken:
        results.update(chain.results)
    return {chain.number for chain in taken}, results


def _replay(
    chain: _Chain,
    events: list[Event],
    updates: dict[int, PaymentUpdate],
    users: dict[str, str | None],
    ctx: Context,
) -> bool:
    """Apply the chain's events to its row in memory, as `on_payment_intent` would one by one.

    False if an event needs what is not in hand: the chain is then left to the per-event path.
    """
    for i in chain.indexes:
        upd = updates[i]
        if upd.user_id is None and upd.stripe_customer_id:
            upd = msgspec.structs.replace(upd, user_id=users.get(upd.stripe_customer_id))
        before: dict[str, Any] | None
        if chain.row is None:
            chain.row = {"id": uuid.uuid4(), **new_row(upd)}
            chain.new = True
            before = None
        else:
            changes = changes_to(chain.row, upd)
            if not changes:
                chain.results[i] = Applied("stale", upd.user_id)
                continue
            before = dict(chain.row)
            chain.row = {**chain.row, **changes}
        if before is not None and before["status"] == "succeeded":
            return False  # its entitlement rows may exist: `settle` reads them
        row, at = chain.row, event_time(events[i])
        chain.announced.extend(payment_effects.payment_events(row, before, at))
        grant = payment_effects.grant_of(row, ctx)
        user = str(row["user_id"]) if row["user_id"] else None
        for feature in entitlements.first_grants(user, grant):
            assert user is not None  # first_grants grants nothing without a user
            source = str(row["id"])
            chain.grants.append(
                (user, feature, "payment", source, grant.product, grant.reason, grant.expires_at)
            )
            chain.announced.append(entitlements.granted(user, feature, "payment", source, grant, at))
        chain.results[i] = Applied("applied", upd.user_id)
    return True


def _columns(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The rows as the arrays of `_COLUMNS`, in its order."""
    return [
        [str(r["id"]) for r in rows],
        [str(r["user_id"]) if r["user_id"] else None for r in rows],
        [r["stripe_payment_intent_id"] for r in rows],
        [r["stripe_checkout_session_id"] for r in rows],
        [r["stripe_customer_id"] for r in rows],
        [r["subscription_id"] for r in rows],
        [r["amount"] for r in rows],
        [r["mode"] for r in rows],
        [r["currency"] for r in rows],
        [r["status"] for r in rows],
        [r["product"] for r in rows],
        [r["last_error"] for r in rows],
        [msgspec.json.encode(r["metadata"]).decode() for r in rows],
        [r["status_event_created"] for r in rows],
        [r["status_rank"] for r in rows],
        [r["paid_at"] for r in rows],
    ]


async def _write(conn: AsyncConnection[Any], chains: list[_Chain]) -> None:
    """The chains' payment rows (new ones, then changed ones), their grants, then their outbox events."""
    new = [c.row for c in chains if c.new and c.row is not None]
    changed = [
        c.row
        for c in chains
        if not c.new and c.row is not None and any(r.outcome == "applied" for r in c.results.values())
    ]
    if new:
        await send(conn, _INSERT, _columns(new))
    if changed:
        await send(conn, _UPDATE, _columns(changed))
    await entitlements.grant_many(conn, [g for c in chains for g in c.grants])
    for chain in chains:
        for domain_event in chain.announced:
            await emit(conn, domain_event)
