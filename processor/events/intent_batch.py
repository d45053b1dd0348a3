"""A batch's PaymentIntent chains applied as sets: a few statements per batch instead of ~4 per event.

Most of a shop's events are payment_intent.* and the charge.* events of the same PaymentIntents, and the
per-event path (`payments.on_payment_intent`, `charges.on_charge`) waits on Postgres two or three times
for each one. Here every chain of a batch (`processor.chains`) whose events all concern one
PaymentIntent — its own events, and those of its charges — is applied at once: the locks of all such
chains are taken and their payment and charge rows read in one round trip; each chain's events are
applied to those rows in memory, in order, by the same rules (`payments.changes_to`, `objects.decide`,
`payment_effects`, `entitlements`); and the new and changed payments, the new and changed charges and
the new grants are written with one statement each. What each event produces (its outcome, the rows,
the entitlements, the outbox events) is what the per-event path produces.

A chain is left to the per-event path when what it needs is not all in hand: refunds or disputes of
the PaymentIntent or of its charges are stored (`payment_effects.settle` folds them in), a charge's
refunded amount would move the payment, or the payment was already succeeded when it was reached
(its entitlement rows would have to be read).
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
from processor.events.charges import charge_snapshot, on_charge, ref
from processor.events.payments import event_time, intent_update, on_payment_intent
from processor.outbox import emit
from processor.statements import send
from processor.store import payment_effects
from processor.store.locks import Claims, lock_chains
from processor.store.objects import Snapshot, decide
from processor.store.payments import PaymentUpdate, changes_to, new_row
from shared.domain_events import DomainEvent

_ROWS: Final = "SELECT * FROM payments WHERE stripe_payment_intent_id = ANY(%s) FOR UPDATE"
# The charges of these PaymentIntents, and the charges the batch names.
_CHARGES: Final = (
    "SELECT * FROM charges WHERE stripe_payment_intent_id = ANY(%(pi)s) OR id = ANY(%(ch)s) FOR UPDATE"
)
# Refunds and disputes of these PaymentIntents or of their charges (see the module doc).
_REFUNDED: Final = """
SELECT stripe_payment_intent_id, stripe_charge_id FROM refunds
 WHERE stripe_payment_intent_id = ANY(%(pi)s) OR stripe_charge_id = ANY(%(ch)s)
    OR stripe_charge_id IN (SELECT id FROM charges WHERE stripe_payment_intent_id = ANY(%(pi)s))
UNION ALL
SELECT stripe_payment_intent_id, stripe_charge_id FROM disputes
 WHERE stripe_payment_intent_id = ANY(%(pi)s) OR stripe_charge_id = ANY(%(ch)s)
    OR stripe_charge_id IN (SELECT id FROM charges WHERE stripe_payment_intent_id = ANY(%(pi)s))
"""
_CHARGE_COLUMNS: Final = """unnest(%b::text[], %b::text[], %b::text[], %b::int8[], %b::int8[], %b::text[],
                %b::text[], %b::text[], %b::int8[], %b::int8[])
       AS v(id, intent, customer, amount, amount_refunded, currency, status, failure_code, created, rank)"""
_INSERT_CHARGES: Final = f"""
INSERT INTO charges (id, stripe_payment_intent_id, stripe_customer_id, amount, amount_refunded, currency,
                     status, failure_code, status_event_created, status_rank)
SELECT v.id, v.intent, v.customer, v.amount, v.amount_refunded, v.currency, v.status, v.failure_code,
       v.created, v.rank
  FROM {_CHARGE_COLUMNS}
"""
_UPDATE_CHARGES: Final = f"""
UPDATE charges c
   SET stripe_payment_intent_id = v.intent, stripe_customer_id = v.customer, amount = v.amount,
       amount_refunded = v.amount_refunded, currency = v.currency, status = v.status,
       failure_code = v.failure_code, status_event_created = v.created, status_rank = v.rank,
       updated_at = now()
  FROM {_CHARGE_COLUMNS}
 WHERE c.id = v.id
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
    indexes: list[int]  # its new events' places in the batch, in order (duplicates left out)
    intent: str
    row: dict[str, Any] | None = None  # the payment row, as the chain's events leave it
    new: bool = False
    touched: bool = False  # an existing payment row to write (its `updated_at`, at least)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)  # the PaymentIntent's, as left
    new_charges: set[str] = field(default_factory=set)
    changed_charges: set[str] = field(default_factory=set)
    results: dict[int, Applied] = field(default_factory=dict)
    announced: list[DomainEvent] = field(default_factory=list)
    grants: list[entitlements.GrantRow] = field(default_factory=list)


def _intent_of(events: list[Event], indexes: list[int], handlers: dict[str, Handler]) -> str | None:
    """The one PaymentIntent the chain's events all concern (its own events or its charges'), if any."""
    intents = set()
    for i in indexes:
        event = events[i]
        handler = handlers.get(event.type)
        if handler is on_payment_intent:
            intents.add(event.object_id)
        elif handler is on_charge:
            intents.add(ref(event.data.object.get("payment_intent")))
        else:
            return None
    intent = intents.pop() if len(intents) == 1 else None
    return intent if isinstance(intent, str) else None


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
    # The payloads are checked before anything is locked or read, as on the per-event path.
    updates: dict[int, PaymentUpdate] = {}
    snapshots: dict[int, Snapshot] = {}
    for chain in candidates:
        for i in chain.indexes:
            if handlers[events[i].type] is on_charge:
                snapshots[i] = charge_snapshot(events[i])
            else:
                updates[i] = intent_update(events[i])
    await lock_chains(
        conn,
        claims,
        [
            (
                chain.number,
                sorted({c for i in chain.indexes if i in updates and (c := updates[i].stripe_customer_id)}),
                [f"pi:{chain.intent}"]
                + [f"charges:{snapshots[i].object_id}" for i in chain.indexes if i in snapshots],
            )
            for chain in candidates
        ],
    )
    intents = sorted(chain.intent for chain in candidates)
    named_charges = sorted({snapshot.object_id for snapshot in snapshots.values()})
    keys = {"pi": intents, "ch": named_charges}
    rows_cur = await conn.cursor(row_factory=dict_row).execute(_ROWS, (intents,))
    charges_cur = await conn.cursor(row_factory=dict_row).execute(_CHARGES, keys)
    refunded_cur = await conn.cursor().execute(_REFUNDED, keys)
    unnamed = sorted(
        {u.stripe_customer_id for u in updates.values() if u.user_id is None and u.stripe_customer_id}
    )
    users_cur = await conn.cursor().execute(_USERS, (unnamed,)) if unnamed else None
    rows = {row["stripe_payment_intent_id"]: row for row in await rows_cur.fetchall()}
    charges = {row["id"]: row for row in await charges_cur.fetchall()}
    refunded = await refunded_cur.fetchall()
    users = dict(await users_cur.fetchall()) if users_cur else {}

    taken = []
    for chain in candidates:
        chain.row = rows.get(chain.intent)
        chain.charges = {
            charge_id: row
            for charge_id, row in charges.items()
            if row["stripe_payment_intent_id"] == chain.intent
            or any(snapshots[i].object_id == charge_id for i in chain.indexes if i in snapshots)
        }
        if any(pi == chain.intent or charge in chain.charges for pi, charge in refunded):
            continue
        if _replay(chain, events, updates, snapshots, users, ctx):
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
    snapshots: dict[int, Snapshot],
    users: dict[str, str | None],
    ctx: Context,
) -> bool:
    """Apply the chain's events to its rows in memory, as `on_payment_intent` and `on_charge` would one
    by one. False if an event needs what is not in hand: the chain is then left to the per-event path.
    """
    if chain.row is not None and chain.row["status"] == "succeeded":
        return False  # its entitlement rows exist: a change, or a charge's settle, would read them
    for i in chain.indexes:
        if i in snapshots:
            if not _charge(chain, i, snapshots[i]):
                return False
            continue
        upd = updates[i]
        if upd.user_id is None and upd.stripe_customer_id:
            upd = msgspec.structs.replace(upd, user_id=users.get(upd.stripe_customer_id))
        before: dict[str, Any] | None
        if chain.row is None:
            if _refunded(chain) > 0:
                return False  # a charge refunded before its payment: `settle` folds it in
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
            chain.touched = True
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


def _charge(chain: _Chain, i: int, snapshot: Snapshot) -> bool:
    """A charge.* event, as `on_charge` applies it; False if it would move the payment (a refund)."""
    charge_id = snapshot.object_id
    row = chain.charges.get(charge_id)
    values = decide(row, snapshot)
    if row is None:
        chain.charges[charge_id] = values
        chain.new_charges.add(charge_id)
    elif values:
        chain.charges[charge_id] = {**row, **values}
        if charge_id not in chain.new_charges:
            chain.changed_charges.add(charge_id)
    else:
        chain.results[i] = Applied("stale")
        return True
    payment = chain.row
    if payment is None:  # nothing to settle yet
        chain.results[i] = Applied("applied", None)
        return True
    if _refunded(chain) > payment["amount_refunded"]:
        return False  # the payment's refunded amount would grow: events, and perhaps a revoked grant
    # `settle` recomputes the row to what it is (and rewrites `updated_at`); with the payment not yet
    # succeeded at the batch's start, its entitlement rows are this chain's grants, which still match.
    chain.touched = not chain.new
    chain.results[i] = Applied("applied", str(payment["user_id"]) if payment["user_id"] else None)
    return True


def _refunded(chain: _Chain) -> int:
    """The greatest refunded amount of the PaymentIntent's charges, as `payment_effects.settle` reads it."""
    return max(
        (
            c["amount_refunded"]
            for c in chain.charges.values()
            if c["stripe_payment_intent_id"] == chain.intent
        ),
        default=0,
    )


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
    """The chains' payments and charges (new ones, then changed ones), their grants, their outbox events."""
    new = [c.row for c in chains if c.new and c.row is not None]
    changed = [c.row for c in chains if c.touched and not c.new and c.row is not None]
    if new:
        await send(conn, _INSERT, _columns(new))
    if changed:
        await send(conn, _UPDATE, _columns(changed))
    new_charges = [c.charges[i] for c in chains for i in sorted(c.new_charges)]
    changed_charges = [c.charges[i] for c in chains for i in sorted(c.changed_charges)]
    if new_charges:
        await send(conn, _INSERT_CHARGES, _charge_columns(new_charges))
    if changed_charges:
        await send(conn, _UPDATE_CHARGES, _charge_columns(changed_charges))
    await entitlements.grant_many(conn, [g for c in chains for g in c.grants])
    for chain in chains:
        for domain_event in chain.announced:
            await emit(conn, domain_event)


def _charge_columns(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The charge rows as the arrays of `_CHARGE_COLUMNS`, in its order."""
    names = ("id", "stripe_payment_intent_id", "stripe_customer_id", "amount", "amount_refunded", "currency")
    tail = ("status", "failure_code", "status_event_created", "status_rank")
    return [[r[name] for r in rows] for name in (*names, *tail)]
