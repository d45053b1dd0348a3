"""`paybus inspect`: why a user has or lacks a feature, with payments, events, requests and dead letters."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aio_pika
import psycopg

from shared import samples
from shared.amqp import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE
from tests.chaos.toolkit import declare, paybus
from tests.conftest import env_for
from tests.support import queue_depth


async def _seed(conn: psycopg.AsyncConnection[Any], user: str) -> dict[str, str]:
    paid, failed, sub = samples.new_id("pi"), samples.new_id("pi"), samples.new_id("sub")
    await conn.execute(
        "INSERT INTO payments"
        " (user_id, stripe_payment_intent_id, amount, currency, status, product, last_error)"
        " VALUES (%s, %s, 49900, 'inr', 'succeeded', 'course_bundle', NULL),"
        " (%s, %s, 29900, 'inr', 'failed', 'lifetime_reports', 'insufficient_funds')",
        (user, paid, user, failed),
    )
    await conn.execute(
        "INSERT INTO subscriptions (id, user_id, status, price_id, product, canceled_at)"
        " VALUES (%s, %s, 'canceled', 'price_1PgafmB7WZ01zgkW6dKueIc5', 'pro_monthly',"
        " now() - interval '2 days')",
        (sub, user),
    )
    await conn.execute(
        "INSERT INTO entitlements (user_id, feature, source_type, source_id, product, active, reason,"
        " granted_at, revoked_at, expires_at) VALUES"
        " (%s, 'course:bundle', 'payment', %s, 'course_bundle', true, NULL, now() - interval '1 day', NULL,"
        "  now() + interval '364 days'),"
        " (%s, 'premium', 'subscription', %s, 'pro_monthly', false, 'subscription canceled',"
        "  now() - interval '40 days', now() - interval '2 days', NULL)",
        (user, paid, user, sub),
    )
    for event_id, event_type, obj, outcome in (
        (samples.new_id("evt"), "payment_intent.succeeded", paid, "applied"),
        (samples.new_id("evt"), "payment_intent.payment_failed", failed, "applied"),
        (samples.new_id("evt"), "payment_intent.processing", failed, "stale"),
    ):
        await conn.execute(
            "INSERT INTO stripe_events (id, type, created, livemode, object_id, user_id, payload, outcome)"
            " VALUES (%s, %s, now(), false, %s, %s, '{}'::jsonb, %s)",
            (event_id, event_type, obj, user, outcome),
        )
    await conn.execute(
        "INSERT INTO payment_requests"
        " (idempotency_key, kind, user_id, status, params_hash, request, stripe_object_id)"
        " VALUES (%s, 'payment_intent.create', %s, 'succeeded', 'h', '{}'::jsonb, %s)",
        (str(uuid.uuid4()), user, paid),
    )
    return {"paid": paid, "failed": failed, "sub": sub}


async def _dead_letter_for(amqp: str, user: str) -> str:
    envelope = samples.sample_event("payment_intent.succeeded", user_id=user)
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        headers = {
            "stripe-event-id": envelope["id"],
            "x-paybus-reason": "retries-exhausted",
            "x-paybus-attempts": 6,
        }
        await exchange.publish(aio_pika.Message(samples.encode(envelope), headers=headers), routing_key="")
    return str(envelope["id"])


async def test_inspect_user_explains_each_feature_and_shows_the_trail(
    database: str, make_vhost: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    amqp = make_vhost()
    await declare(amqp)
    env = env_for(database, amqp)
    user = str(uuid.uuid4())
    ids = await _seed(conn, user)
    dead = await _dead_letter_for(amqp, user)

    code, out, err = await paybus("inspect", "user", user, "--feature", "premium", "--json", env=env)
    assert code == 0, err
    report = json.loads(out)
    assert report["feature"]["has_access"] is False
    why = " | ".join(report["feature"]["why"])
    assert "revoked" in why and "subscription canceled" in why and f"{ids['sub']} is canceled" in why
    by_feature = {e["feature"]: e for e in report["entitlements"]}
    assert by_feature["course:bundle"]["active_now"] is True
    assert by_feature["course:bundle"]["why"].startswith("active until")
    assert by_feature["premium"]["why"].startswith("inactive: revoked")
    assert {p["stripe_payment_intent_id"]: p["status"] for p in report["payments"]} == {
        ids["paid"]: "succeeded",
        ids["failed"]: "failed",
    }
    assert [e["outcome"] for e in report["event_trail"]].count("stale") == 1
    assert len(report["payment_requests"]) == 1
    assert [d["event_id"] for d in report["dead_letters"]] == [dead]
    assert await queue_depth(amqp, DEAD_LETTER_QUEUE) == 1  # looked at, left in place

    code, out, _ = await paybus("inspect", "user", user, "--feature", "reports", env=env)
    assert code == 0
    assert "feature reports: NO ACCESS" in out
    assert f"lifetime_reports: {ids['failed']} is failed" in out
    code, out, _ = await paybus(
        "inspect", "user", user, "--feature", "course:bundle", "--no-dead-letters", env=env
    )
    assert "feature course:bundle: HAS ACCESS" in out


async def test_inspect_payment_and_bad_input(
    database: str, make_vhost: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    amqp = make_vhost()
    await declare(amqp)
    env = env_for(database, amqp)
    user = str(uuid.uuid4())
    ids = await _seed(conn, user)
    code, out, err = await paybus("inspect", "payment", ids["failed"], env=env)
    assert code == 0, err
    assert "status failed" in out and "insufficient_funds" in out and "payment_intent.payment_failed" in out
    code, _, err = await paybus("inspect", "user", "not-a-uuid", env=env)
    assert code == 2 and "not a user UUID" in err
    code, _, err = await paybus("inspect", "payment", "pi_does_not_exist", env=env)
    assert code == 1 and "no payment" in err
