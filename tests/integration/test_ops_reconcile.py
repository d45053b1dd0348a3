"""`paybus reconcile` against a fake Stripe Events API: pages, budget, pushes only what is missing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from aiohttp import web

from shared import samples
from shared.amqp import EVENTS_QUEUE
from tests.chaos.toolkit import declare, drain, paybus
from tests.conftest import env_for
from tests.support import free_port


class FakeEvents:
    """`GET /v1/events` with Stripe's list shape, `starting_after` paging and an optional 429 first."""

    def __init__(
        self,
        events: list[dict[str, Any]],
        rate_limit_first: bool = False,
        intents: list[dict[str, Any]] | None = None,
    ) -> None:
        self.events = sorted(events, key=lambda e: -int(e["created"]))  # newest first, like Stripe
        self.intents = intents or []
        self.requests: list[dict[str, str]] = []
        self.rate_limit_first = rate_limit_first

    async def list_events(self, request: web.Request) -> web.Response:
        assert request.headers["Authorization"].startswith("Bearer sk_")
        self.requests.append(dict(request.query))
        if self.rate_limit_first and len(self.requests) == 1:
            return web.json_response(
                {"error": {"type": "rate_limit_error"}}, status=429, headers={"Retry-After": "0"}
            )
        gte = int(request.query["created[gte]"])
        if request.path == "/v1/payment_intents":
            chosen = [i for i in self.intents if i["created"] >= gte]
        else:
            assert request.query["delivery_success"] == "false"
            chosen = [e for e in self.events if e["created"] >= gte]
        after = request.query.get("starting_after")
        if after:
            chosen = chosen[[e["id"] for e in chosen].index(after) + 1 :]
        limit = int(request.query.get("limit", "10"))
        return web.json_response(
            {"object": "list", "url": "/v1/events", "has_more": len(chosen) > limit, "data": chosen[:limit]}
        )


@pytest.fixture
async def fake_stripe() -> AsyncIterator[tuple[str, list[FakeEvents]]]:
    holder: list[FakeEvents] = []

    async def handler(request: web.Request) -> web.Response:
        return await holder[0].list_events(request)

    app = web.Application()
    app.router.add_get("/v1/events", handler)
    app.router.add_get("/v1/payment_intents", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", holder
    await runner.cleanup()


def _events(count: int, now: int) -> list[dict[str, Any]]:
    return [samples.sample_event("payment_intent.succeeded", created=now - 3600 - i) for i in range(count)]


async def _store(conn: psycopg.AsyncConnection[Any], events: list[dict[str, Any]]) -> None:
    for e in events:
        await conn.execute(
            "INSERT INTO stripe_events (id, type, created, livemode, payload, outcome)"
            " VALUES (%s, %s, to_timestamp(%s), false, %s::jsonb, 'applied')",
            (e["id"], e["type"], e["created"], json.dumps(e)),
        )


async def test_reconcile_pages_through_undelivered_events_and_pushes_only_the_missing_ones(
    database: str, make_vhost: Any, conn: psycopg.AsyncConnection[Any], fake_stripe: Any
) -> None:
    base, holder = fake_stripe
    now = int(time.time())
    events = _events(230, now)
    old = samples.sample_event("payment_intent.created", created=now - 5 * 86_400)  # outside the window
    right, wrong, unknown, open_ = (
        samples.payment_intent(status=s) for s in ("succeeded", "canceled", "succeeded", "processing")
    )
    for intent in (right, wrong, unknown, open_):
        intent["created"] = now - 7200
    holder.append(FakeEvents([*events, old], rate_limit_first=True, intents=[right, wrong, unknown, open_]))
    await _store(conn, events[:80])  # these arrived after all
    for intent, status in ((right, "succeeded"), (wrong, "failed"), (open_, "open")):
        await conn.execute(
            "INSERT INTO payments (stripe_payment_intent_id, amount, status) VALUES (%s, 100, %s)",
            (intent["id"], status),
        )
    amqp = make_vhost()
    await declare(amqp)
    env = env_for(database, amqp, STRIPE_API_BASE=base, STRIPE_SECRET_KEY="sk_test_reconcile")

    code, out, err = await paybus("reconcile", "--since", "3d", "--json", "--rate", "25", env=env)
    assert code == 0, err
    report = json.loads(out)
    assert report["undelivered_listed"] == 230
    assert report["already_stored"] == {"applied": 80}
    assert {m["id"] for m in report["missing"]} == {e["id"] for e in events[80:]}
    assert len(report["pushed"]) == 150 and report["errors"] == {}
    fake = holder[0]
    assert len(fake.requests) == report["requests"] == 5  # one 429, three pages of events, one of intents
    assert report["objects_checked"] == 4 and report["objects_complete"] is True
    assert sorted((d["object"], d["stripe"], d["paybus"]) for d in report["object_drift"]) == sorted(
        [(wrong["id"], "canceled", "failed"), (unknown["id"], "succeeded", "missing")]
    )  # an intent still processing is not drift
    assert abs(int(fake.requests[0]["created[gte]"]) - (now - 3 * 86_400)) < 60
    assert "starting_after" in fake.requests[-2]

    pushed = await drain(amqp, EVENTS_QUEUE)
    assert sorted(json.loads(m.body)["id"] for m in pushed) == sorted(e["id"] for e in events[80:])
    assert {m.routing_key for m in pushed} == {"payment_intent.succeeded"}
    assert all((m.headers or {}).get("stripe-event-id") for m in pushed)


async def test_reconcile_stops_at_its_request_budget_and_pushes_nothing(
    database: str, make_vhost: Any, fake_stripe: Any
) -> None:
    base, holder = fake_stripe
    holder.append(FakeEvents(_events(250, int(time.time()))))
    amqp = make_vhost()
    await declare(amqp)
    env = env_for(database, amqp, STRIPE_API_BASE=base)
    code, out, err = await paybus(
        "reconcile", "--since", "2d", "--max-requests", "2", "--rate", "25", env=env
    )
    assert code == 1 and "budget of 2" in err
    assert len(holder[0].requests) == 2
    assert await drain(amqp, EVENTS_QUEUE) == []
    code, _, err = await paybus("reconcile", "--since", "45d", env=env)
    assert code == 2 and "30 days" in err
