"""Entitlements: pure rules from the catalog (what a payment or subscription grants now) and their SQL.

Entitlement rows are *derived*: after every applied event the handler recomputes what the source
(one payment row or one subscription row) grants in its current state and `sync` makes the rows
match, emitting `entitlement.granted` / `entitlement.revoked` only for real changes. Since the
source rows converge whatever the delivery order (see `processor.ordering`), so do entitlements,
with no incremental toggles that could be applied twice or out of turn.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection

from processor.catalog import Catalog
from processor.outbox import emit, new_id
from processor.statements import send
from shared.domain_events import DomainEvent, EntitlementGranted, EntitlementRevoked

# Subscription statuses that grant access outright; `past_due` grants until the period end + grace.
SUBSCRIPTION_GRANTS: Final = frozenset({"active", "trialing"})


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """What a source grants right now: these features, active or not, until ``expires_at``."""

    product: str | None
    features: tuple[str, ...]
    active: bool
    expires_at: datetime | None = None
    reason: str


class PaymentFacts(msgspec.Struct, frozen=True, kw_only=True):
    mode: str
    status: str
    product: str | None
    amount: int
    amount_refunded: int
    dispute_status: str | None
    paid_at: datetime | None


class SubscriptionFacts(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    product: str | None
    current_period_end: datetime | None
    status_changed_at: datetime


def for_payment(p: PaymentFacts, catalog: Catalog) -> Grant:
    """A one-time purchase grants its product's features from payment for `access_days` (or no end).

    A full refund or a lost dispute takes access away; a partial refund does not, and a won dispute
    gives it back (the dispute state is the dispute's current one, not an event).
    """
    product = catalog.by_key(p.product)
    features = product.features if product is not None and p.mode == "payment" else ()
    key = product.key if product is not None else p.product
    if p.status != "succeeded":
        return Grant(product=key, features=features, active=False, reason=p.status)
    if p.amount > 0 and p.amount_refunded >= p.amount:
        return Grant(product=key, features=features, active=False, reason="refunded")
    if p.dispute_status == "lost":
        return Grant(product=key, features=features, active=False, reason="dispute-lost")
    expires = None
    if product is not None and product.access_days is not None and p.paid_at is not None:
        expires = p.paid_at + timedelta(days=product.access_days)
    return Grant(product=key, features=features, active=True, expires_at=expires, reason="paid")


def for_subscription(s: SubscriptionFacts, catalog: Catalog, grace: timedelta) -> Grant:
    """Active and trialing grant; past_due keeps access until the period end + grace; all else revokes.

    Revoked states include canceled, unpaid, incomplete_expired, paused (and incomplete: never paid).
    `expires_at` makes a past_due grant lapse by itself (`active_entitlements` honours it), so no job
    has to run when the grace period ends.
    """
    product = catalog.by_key(s.product)
    features = product.features if product is not None else ()
    key = product.key if product is not None else s.product
    if s.status in SUBSCRIPTION_GRANTS:
        return Grant(product=key, features=features, active=True, reason=s.status)
    if s.status == "past_due":
        end = s.current_period_end or s.status_changed_at
        return Grant(product=key, features=features, active=True, expires_at=end + grace, reason="past_due")
    return Grant(product=key, features=features, active=False, reason=s.status)


# A grant of a feature the source already had (active or revoked) renews that row.
_REGRANT: Final = """
ON CONFLICT (user_id, feature, source_id) DO UPDATE
   SET active = true, reason = EXCLUDED.reason, product = EXCLUDED.product, expires_at = EXCLUDED.expires_at,
       granted_at = CASE WHEN entitlements.active THEN entitlements.granted_at ELSE now() END,
       revoked_at = NULL, updated_at = now()
"""
_ROWS: Final = """
SELECT id, user_id::text, feature, active, expires_at, product, reason FROM entitlements
 WHERE source_type = %s AND source_id = %s ORDER BY id FOR UPDATE
"""
_REVOKE: Final = """
UPDATE entitlements SET active = false, reason = %s, revoked_at = now(), updated_at = now() WHERE id = %s
"""
_REVOKE_FEATURE: Final = """
UPDATE entitlements SET active = false, reason = %s, revoked_at = now(), updated_at = now()
 WHERE user_id = %s AND feature = %s AND source_id = %s
"""
_RELABEL: Final = "UPDATE entitlements SET product = %s, reason = %s, updated_at = now() WHERE id = %s"


class SyncPlan(msgspec.Struct, kw_only=True):
    """What `sync` writes for one source: relabelled and revoked rows, grants, and the outbox events, in
    the order `sync` emits them."""

    relabels: list[tuple[str | None, str, int]] = []  # (product, reason, row id)
    revoked: list[tuple[str, int]] = []  # (reason, row id)
    revoked_features: list[tuple[str, str, str, str]] = []  # (reason, user, feature, source id)
    grants: list[GrantRow] = []
    announced: list[DomainEvent] = []


def plan_sync(
    rows: list[tuple[Any, ...]],
    *,
    source_type: str,
    source_id: str,
    user_id: str | None,
    grant: Grant,
    at: datetime,
) -> SyncPlan:
    """What makes the entitlement ``rows`` of one source match ``grant`` (pure: `sync` writes it).

    ``rows`` are (id, user id, feature, active, expires at, product, reason) in id order, as `_ROWS`
    reads them. Rows need a user: while the source is unmapped nothing is granted.
    """
    plan = SyncPlan()
    wanted = set(grant.features) if user_id else set()
    current = {}
    for row_id, row_user, feature, active, expires_at, product, reason in rows:
        if row_user == user_id and feature in wanted:
            current[feature] = (active, expires_at)
            if active and grant.active and (product, reason) != (grant.product, grant.reason):
                # Same access, other label (a plan change keeping this feature, trial -> active): no event.
                plan.relabels.append((grant.product, grant.reason, row_id))
        elif active:
            plan.revoked.append(("product-changed", row_id))
            plan.announced.append(
                revoked(row_user, feature, source_type, source_id, grant.product, "product-changed", at)
            )
    if user_id is None:
        return plan
    for feature in sorted(wanted):
        active, expires_at = current.get(feature, (False, None))
        if grant.active and (not active or expires_at != grant.expires_at):
            plan.grants.append(
                (user_id, feature, source_type, source_id, grant.product, grant.reason, grant.expires_at)
            )
            plan.announced.append(granted(user_id, feature, source_type, source_id, grant, at))
        elif not grant.active and active:
            plan.revoked_features.append((grant.reason, user_id, feature, source_id))
            plan.announced.append(
                revoked(user_id, feature, source_type, source_id, grant.product, grant.reason, at)
            )
    return plan


async def sync(
    conn: AsyncConnection[Any],
    *,
    source_type: str,
    source_id: str,
    user_id: str | None,
    grant: Grant,
    at: datetime,
    no_rows: bool = False,
) -> None:
    """Make the entitlement rows of one source match ``grant``; emit an outbox event per real change.

    Linking the user later (customer mapping) calls this again. ``no_rows``: the caller knows that no
    entitlement row names this source yet (it was inserted in this transaction, or has never granted
    anything), so there is nothing to read first.
    """
    rows = [] if no_rows else await (await conn.execute(_ROWS, (source_type, source_id))).fetchall()
    plan = plan_sync(rows, source_type=source_type, source_id=source_id, user_id=user_id, grant=grant, at=at)
    await write_plans(conn, [plan])


async def write_plans(conn: AsyncConnection[Any], plans: list[SyncPlan]) -> None:
    """Write what `plan_sync` planned, for one source or many; the grants in one statement."""
    for plan in plans:
        for relabel in plan.relabels:
            await send(conn, _RELABEL, relabel)
        for revoke in plan.revoked:
            await send(conn, _REVOKE, revoke)
        for feature in plan.revoked_features:
            await send(conn, _REVOKE_FEATURE, feature)
    await grant_many(conn, [grant for plan in plans for grant in plan.grants])
    for plan in plans:
        for event in plan.announced:
            await emit(conn, event)


def granted(
    user_id: str, feature: str, source_type: str, source_id: str, grant: Grant, at: datetime
) -> EntitlementGranted:
    return EntitlementGranted(
        id=new_id(),
        occurred_at=at,
        user_id=user_id,
        feature=feature,
        source_type=source_type,
        source_id=source_id,
        product=grant.product,
        expires_at=grant.expires_at,
    )


def first_grants(user_id: str | None, grant: Grant) -> list[str]:
    """The features ``grant`` grants to a source that has no entitlement rows yet (`sync`, ``no_rows``)."""
    return sorted(grant.features) if user_id and grant.active else []


# Grants, many rows in one statement, each (user, feature, source) at most once.
_GRANT_MANY: Final = (
    """
INSERT INTO entitlements (user_id, feature, source_type, source_id, product, active, reason, granted_at,
                          expires_at)
SELECT v.user_id::uuid, v.feature, v.source_type, v.source_id, v.product, true, v.reason, now(), v.expires_at
  FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::timestamptz[])
       AS v(user_id, feature, source_type, source_id, product, reason, expires_at)"""
    + _REGRANT
)

GrantRow = tuple[str, str, str, str, str | None, str, datetime | None]


async def grant_many(conn: AsyncConnection[Any], rows: list[GrantRow]) -> None:
    """Write grants as `sync` does, in one statement: (user, feature, source type, source id, product,
    reason, expires at). A later row for the same (user, feature, source) replaces an earlier one."""
    last: dict[tuple[str, str, str], GrantRow] = {}
    for row in rows:
        last[row[0], row[1], row[3]] = row
    if last:
        await send(conn, _GRANT_MANY, [list(column) for column in zip(*last.values(), strict=True)])


def revoked(
    user_id: str,
    feature: str,
    source_type: str,
    source_id: str,
    product: str | None,
    reason: str,
    at: datetime,
) -> EntitlementRevoked:
    return EntitlementRevoked(
        id=new_id(),
        occurred_at=at,
        user_id=user_id,
        feature=feature,
        source_type=source_type,
        source_id=source_id,
        product=product,
        reason=reason,
    )
