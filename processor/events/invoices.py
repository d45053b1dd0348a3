"""invoice.* events -> `invoices`: amounts, status and the tax-invoice links users ask for.

Access itself follows the subscription: Stripe moves the subscription to `past_due` / `unpaid` /
`active` as invoices fail or get paid and announces that with customer.subscription.updated, whose
handler derives the entitlements. The invoice row is the bill and the links to it.

The subscription of an invoice is `parent.subscription_details.subscription` in API versions from
2025-03-31 ("basil") and the top-level `subscription` before; both are read.
Ranks: draft < open < uncollectible < void < paid; void and paid are terminal (an uncollectible
invoice can still be paid or voided).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from psycopg import AsyncConnection

from processor.context import Context
from processor.events import Applied, Event, Handler
from processor.events.charges import ref
from processor.store import objects
from processor.store.locks import lock_customer
from processor.users import customer_id, resolve_user

STATUS_RANK: Final = {"draft": 0, "open": 1, "uncollectible": 2, "void": 3, "paid": 4}
TERMINAL: Final = frozenset({"void", "paid"})


class Period(msgspec.Struct, frozen=True):
    start: int | None = None
    end: int | None = None


class Line(msgspec.Struct, frozen=True):
    period: Period | None = None
    subscription: str | dict[str, Any] | None = None


class Lines(msgspec.Struct, frozen=True):
    data: list[Line] = []


class SubscriptionDetails(msgspec.Struct, frozen=True):
    subscription: str | dict[str, Any] | None = None


class Parent(msgspec.Struct, frozen=True):
    subscription_details: SubscriptionDetails | None = None


class Transitions(msgspec.Struct, frozen=True):
    paid_at: int | None = None


class Invoice(msgspec.Struct, frozen=True):
    id: str
    status: str | None = None
    amount_due: int = 0
    amount_paid: int = 0
    currency: str | None = None
    number: str | None = None
    hosted_invoice_url: str | None = None
    invoice_pdf: str | None = None
    period_start: int | None = None
    period_end: int | None = None
    subscription: str | dict[str, Any] | None = None
    payment_intent: str | dict[str, Any] | None = None
    parent: Parent | None = None
    lines: Lines = Lines()
    status_transitions: Transitions = Transitions()


def subscription_of(invoice: Invoice) -> str | None:
    details = invoice.parent.subscription_details if invoice.parent else None
    return (
        (ref(details.subscription) if details else None)
        or ref(invoice.subscription)
        or next((ref(line.subscription) for line in invoice.lines.data if ref(line.subscription)), None)
    )


def service_period(invoice: Invoice) -> tuple[int | None, int | None]:
    """The period the invoice pays for: its first line's (an invoice's own period is the previous one)."""
    line = next((ln.period for ln in invoice.lines.data if ln.period and ln.period.end), None)
    return (line.start, line.end) if line else (invoice.period_start, invoice.period_end)


def _ts(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def invoice_snapshot(event: Event, ctx: Context, user_id: str | None) -> objects.Snapshot:
    """What an invoice.* event says of its invoice (``user_id`` resolved by the caller)."""
    invoice = event.object(Invoice)
    start, end = service_period(invoice)
    return objects.Snapshot(
        object_id=invoice.id,
        status=invoice.status or "draft",
        created=event.created,
        ranks=STATUS_RANK,
        terminal=TERMINAL,
        fields={
            "amount_due": invoice.amount_due,
            "amount_paid": invoice.amount_paid,
            "currency": (invoice.currency or ctx.catalog.currency).lower(),
            "number": invoice.number,
            "hosted_invoice_url": invoice.hosted_invoice_url,
            "invoice_pdf": invoice.invoice_pdf,
            "period_start": _ts(start),
            "period_end": _ts(end),
            "paid_at": _ts(invoice.status_transitions.paid_at),
        },
        learned={
            "subscription_id": subscription_of(invoice),
            "user_id": user_id,
            "stripe_customer_id": customer_id(event.data.object),
            "stripe_payment_intent_id": ref(invoice.payment_intent),
        },
    )


def with_user(snapshot: objects.Snapshot, user_id: str | None) -> objects.Snapshot:
    return dataclasses.replace(snapshot, learned={**snapshot.learned, "user_id": user_id})


async def on_invoice(conn: AsyncConnection[Any], event: Event, ctx: Context) -> Applied:
    snapshot = invoice_snapshot(event, ctx, None)  # the payload is checked before anything is locked
    await lock_customer(conn, snapshot.learned["stripe_customer_id"])
    subscription = snapshot.learned["subscription_id"]
    user_id = await resolve_user(conn, event.data.object)
    if user_id is None and subscription:
        row = await (
            await conn.execute("SELECT user_id::text FROM subscriptions WHERE id = %s", (subscription,))
        ).fetchone()
        user_id = row[0] if row else None
    changed, _, after = await objects.upsert(conn, "invoices", with_user(snapshot, user_id))
    user = str(after["user_id"]) if after["user_id"] else None
    return Applied("applied" if changed else "stale", user)


HANDLERS: Final[dict[str, Handler]] = {
    f"invoice.{name}": on_invoice
    for name in (
        "created",
        "finalized",
        "paid",
        "payment_succeeded",
        "payment_failed",
        "payment_action_required",
        "voided",
        "marked_uncollectible",
        "updated",
    )
}
