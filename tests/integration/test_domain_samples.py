"""Every handled event type accepts Stripe's own example object, and a malformed one is rejected cleanly."""

from __future__ import annotations

import pytest

from processor.errors import Reject
from shared import samples
from tests.integration.domain_helpers import HANDLERS, Conn, deliver, one


@pytest.mark.parametrize("event_type", sorted(HANDLERS))
async def test_every_handled_type_applies_stripes_example_object(conn: Conn, event_type: str) -> None:
    envelope = samples.sample_event(event_type)
    assert await deliver(conn, envelope) in ("applied", "stale")
    row = await one(conn, "SELECT outcome FROM stripe_events WHERE id = %s", envelope["id"])
    assert row is not None and row["outcome"] in ("applied", "stale")


@pytest.mark.parametrize(
    ("event_type", "breakage"),
    [
        ("customer.subscription.updated", {"status": None}),
        ("invoice.paid", {"amount_due": "a lot"}),
        ("charge.dispute.closed", {"status": 7}),
        ("checkout.session.completed", {"amount_total": "x"}),
    ],
)
async def test_a_malformed_object_is_rejected_without_a_partial_write(
    conn: Conn, event_type: str, breakage: dict[str, object]
) -> None:
    envelope = samples.sample_event(event_type)
    envelope["data"]["object"].update(breakage)
    with pytest.raises(Reject) as rejected:
        await deliver(conn, envelope)
    assert rejected.value.reason == "invalid-payload"
    assert await one(conn, "SELECT 1 AS found FROM stripe_events WHERE id = %s", envelope["id"]) is None
    assert await one(
        conn,
        "SELECT count(*) AS n FROM outbox WHERE payload->>'subscription_id' = %s"
        " OR payload->>'stripe_checkout_session_id' = %s",
        envelope["data"]["object"]["id"],
        envelope["data"]["object"]["id"],
    ) == {"n": 0}
