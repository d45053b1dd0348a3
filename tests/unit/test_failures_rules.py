"""Pure rules of failure handling: schema versions, jittered retry tiers, operator time windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from processor.schema import NEWEST_KNOWN_API_VERSION, unknown_schema
from shared.amqp import DEAD_LETTER_QUEUE, EVENTS_QUEUE, retry_queue_name, retry_tiers, topology
from shared.ops.common import UsageError, parse_since
from shared.ops.lookup import entitlement_status


def test_known_older_and_missing_api_versions_are_accepted() -> None:
    assert unknown_schema(NEWEST_KNOWN_API_VERSION) is None
    assert unknown_schema("2017-08-15") is None  # localstripe's
    assert unknown_schema("2024-06-20.acacia") is None
    assert unknown_schema(None) is None


def test_newer_or_unrecognised_api_versions_are_unknown_schema() -> None:
    assert "newer" in (unknown_schema("2099-01-01.zucchini") or "")
    assert "unrecognised" in (unknown_schema("v2") or "")
    assert unknown_schema("2026-13-01", newest_known="2026-10-28.endive") is not None


def test_each_tier_has_jittered_delay_queues_around_its_delay() -> None:
    assert retry_tiers((1000, 5000)) == ((800, 1000, 1200), (4000, 5000, 6000))
    names = {q.name for q in topology((1000, 5000)).queues}
    for delay in (800, 1000, 1200, 4000, 5000, 6000):
        assert retry_queue_name(EVENTS_QUEUE, delay) in names
        queue = next(
            q for q in topology((1000, 5000)).queues if q.name == retry_queue_name(EVENTS_QUEUE, delay)
        )
        assert queue.arguments["x-message-ttl"] == delay  # queue-level TTL: no head-of-line blocking
        assert queue.arguments["x-dead-letter-routing-key"] == EVENTS_QUEUE


def test_dead_letter_queue_cannot_drop_messages_that_are_peeked_often() -> None:
    [dlq] = [q for q in topology().queues if q.name == DEAD_LETTER_QUEUE]
    assert dlq.arguments["x-queue-type"] == "quorum"
    assert dlq.arguments["x-delivery-limit"] >= 1_000_000


def test_since_takes_durations_and_instants_and_refuses_the_rest() -> None:
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert parse_since("3d", now) == now - timedelta(days=3)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("2026-11-20T10:00:00Z", now) == datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
    with pytest.raises(UsageError):
        parse_since("last tuesday", now)


def test_entitlement_status_says_why() -> None:
    now = datetime(2026, 11, 26, tzinfo=UTC)
    base = {
        "source_type": "payment",
        "source_id": "pi_1",
        "product": "course_bundle",
        "reason": None,
        "granted_at": now - timedelta(days=1),
        "revoked_at": None,
        "expires_at": None,
        "active": True,
    }
    assert entitlement_status(base, now) == (
        True,
        f"active (no expiry): granted {base['granted_at'].isoformat()} by payment pi_1 (course_bundle)",
    )
    expired = {**base, "expires_at": now - timedelta(seconds=1)}
    assert entitlement_status(expired, now)[1].startswith("inactive: expired at")
    revoked = {**base, "active": False, "revoked_at": now, "reason": "refunded"}
    assert (
        entitlement_status(revoked, now)[1].startswith("inactive: revoked at")
        and "refunded" in entitlement_status(revoked, now)[1]
    )
