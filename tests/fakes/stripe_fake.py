"""A small fake Stripe API for what localstripe lacks: Checkout Sessions, billing portal, prices, subs.

It runs in a background thread (so tests may block while paybus processes call it), honours
`Idempotency-Key` the way Stripe does (same key + same params -> the stored response; other params ->
400 idempotency_error), counts the objects it created per key, and can hold a call or fail the next ones.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections import Counter
from typing import Any

from aiohttp import web

# Catalog price ids (catalog.toml) and what they cost.
PRICES: dict[str, dict[str, Any]] = {
    "price_1PgafmB7WZ01zgkW6dKueIc5": {
        "unit_amount": 49900,
        "currency": "inr",
        "recurring": {"interval": "month"},
    },
    "price_1TeamMonthly00000000001": {
        "unit_amount": 149900,
        "currency": "inr",
        "recurring": {"interval": "month"},
    },
    "price_1CourseBundle000000000001": {"unit_amount": 299900, "currency": "inr", "recurring": None},
    "price_1LifetimeReports00000001": {"unit_amount": 999900, "currency": "inr", "recurring": None},
}
_KEY_PART = re.compile(r"([^\[\]]+)|\[([^\[\]]*)\]")


def parse_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (`a[b][0][c]=v`) back into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = [m.group(1) or m.group(2) for m in _KEY_PART.finditer(key)]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _listify(root)


def _listify(node: Any) -> Any:
    if isinstance(node, dict):
        if node and all(k.isdigit() for k in node):
            return [_listify(node[k]) for k in sorted(node, key=int)]
        return {k: _listify(v) for k, v in node.items()}
    return node


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class Call:
    def __init__(
        self, method: str, path: str, key: str | None, params: dict[str, Any], version: str | None
    ) -> None:
        self.method, self.path, self.key, self.params, self.version = method, path, key, params, version


class FakeStripe:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.objects: dict[str, dict[str, Any]] = {}
        self.created_per_key: Counter[str] = Counter()
        self.created: Counter[str] = Counter()  # object type -> count
        self._replies: dict[str, tuple[str, int, dict[str, Any]]] = {}  # key -> (params digest, status, body)
        self._holds: dict[str, threading.Event] = {}
        self._failures: dict[str, list[int]] = {}
        self._no_retry: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- test controls -------------------------------------------------------------------------
    def hold_next(self, path: str) -> threading.Event:
        """The next POST to ``path`` creates its object, then waits to answer until the event is set."""
        event = threading.Event()
        with self._lock:
            self._holds[path] = event
        return event

    def fail_next(self, path: str, *statuses: int, sdk_retries: bool = True) -> None:
        """Answer the next calls to ``path`` with these HTTP statuses (500, 503, 429...), creating nothing.

        ``sdk_retries=False`` sends `Stripe-Should-Retry: false`, so the SDK does not retry on its own.
        """
        with self._lock:
            self._failures.setdefault(path, []).extend(statuses)
            self._no_retry[path] = not sdk_retries

    def calls_to(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]

    def add_subscription(self, *, customer: str, price_id: str, status: str = "active") -> dict[str, Any]:
        sub_id = _id("sub")
        now = int(time.time())
        sub = {
            "id": sub_id,
            "object": "subscription",
            "customer": customer,
            "status": status,
            "cancel_at_period_end": False,
            "canceled_at": None,
            "metadata": {},
            "items": {
                "object": "list",
                "data": [
                    {
                        "id": _id("si"),
                        "object": "subscription_item",
                        "price": {"id": price_id, **PRICES[price_id]},
                        "quantity": 1,
                        "current_period_start": now,
                        "current_period_end": now + 30 * 86400,
                    },
                ],
            },
        }
        self.objects[sub_id] = sub
        return sub

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> FakeStripe:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            app = web.Application()
            app.router.add_route("*", "/{path:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            port = self._runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-stripe", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        with self._lock:
            for event in self._holds.values():
                event.set()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # --- the API --------------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        params = parse_form(list((await request.post()).items())) if request.method == "POST" else {}
        key = request.headers.get("Idempotency-Key")
        with self._lock:
            self.calls.append(Call(request.method, path, key, params, request.headers.get("Stripe-Version")))
            failures = self._failures.get(path)
            if failures:
                status = failures.pop(0)
                headers = {"Stripe-Should-Retry": "false"} if self._no_retry.get(path) else {}
                body = {"error": {"type": "api_error", "message": "fake outage"}}
                return web.json_response(body, status=status, headers=headers)
            if request.method == "POST" and key:
                digest = repr(sorted(_flatten(params)))
                stored = self._replies.get(key)
                if stored is not None:
                    if stored[0] != digest:
                        return web.json_response(
                            {
                                "error": {
                                    "type": "idempotency_error",
                                    "message": "Keys for idempotent requests can only be used with the same parameters",  # noqa: E501
                                }
                            },
                            status=400,
                        )
                    return web.json_response(
                        stored[2], status=stored[1], headers={"Idempotent-Replayed": "true"}
                    )
            before = sum(self.created.values())
            status, body = self._route(request.method, path, params)
            if request.method == "POST" and key:
                self._replies[key] = (digest, status, body)
                self.created_per_key[key] += sum(self.created.values()) - before
            hold = self._holds.pop(path, None) if request.method == "POST" else None
        if hold is not None:
            await asyncio.get_running_loop().run_in_executor(None, hold.wait)
        return web.json_response(body, status=status)

    def _route(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/v1/customers":
            return self._create("customer", "cus", {"email": None, "name": None, "metadata": {}, **params})
        if method == "POST" and path == "/v1/checkout/sessions":
            return self._checkout(params)
        if method == "POST" and path == "/v1/billing_portal/sessions":
            status, body = self._create("billing_portal.session", "bps", params)
            body["url"] = f"https://billing.stripe.com/p/session/{body['id']}"
            return status, body
        if method == "POST" and path == "/v1/payment_intents":
            status, body = self._create(
                "payment_intent", "pi", {**params, "status": "requires_payment_method"}
            )
            body["client_secret"] = f"{body['id']}_secret_{uuid.uuid4().hex[:24]}"
            body["amount"] = int(params.get("amount", 0))
            return status, body
        if len(parts) == 3 and parts[1] in ("customers", "subscriptions"):
            obj = self.objects.get(parts[2])
            if obj is None:
                return 404, {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "resource_missing",
                        "param": "id",
                        "message": f"No such {parts[1][:-1]}: '{parts[2]}'",
                    }
                }
            if method == "GET":
                return 200, obj
            if method == "DELETE":
                if obj.get("status") == "canceled":
                    return 400, {"error": {"type": "invalid_request_error", "message": "already canceled"}}
                obj.update(status="canceled", canceled_at=int(time.time()))
                return 200, obj
            return 200, self._update(obj, params)
        return 404, {
            "error": {"type": "invalid_request_error", "message": f"Unrecognized request URL ({path})"}
        }

    def _create(self, kind: str, prefix: str, fields: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        obj = {**fields, "id": _id(prefix), "object": kind, "created": int(time.time()), "livemode": False}
        self.objects[obj["id"]] = obj
        self.created[kind] += 1
        return 200, obj

    def _update(self, obj: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        for name, value in params.items():
            if name == "items":
                for change in value:
                    item = next(i for i in obj["items"]["data"] if i["id"] == change["id"])
                    item["price"] = {"id": change["price"], **PRICES[change["price"]]}
            elif name == "cancel_at_period_end":
                obj[name] = value == "true"
            elif name == "metadata":
                obj["metadata"] = {**obj.get("metadata", {}), **value}
            elif name != "proration_behavior":
                obj[name] = value
        return obj

    def _checkout(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        items = params.get("line_items") or []
        if not items or params.get("mode") not in ("payment", "subscription"):
            return 400, {
                "error": {"type": "invalid_request_error", "message": "line_items and mode are required"}
            }
        total, currency = 0, None
        for item in items:
            quantity = int(item.get("quantity", 1))
            if "price" in item:
                price = PRICES.get(item["price"])
                if price is None:
                    return 400, {
                        "error": {
                            "type": "invalid_request_error",
                            "code": "resource_missing",
                            "message": f"No such price: '{item['price']}'",
                        }
                    }
                total += price["unit_amount"] * quantity
                currency = price["currency"]
            else:
                data = item["price_data"]
                total += int(data["unit_amount"]) * quantity
                currency = data["currency"]
        status, session = self._create("checkout.session", "cs_test", params)
        session.update(
            url=f"https://checkout.stripe.com/c/pay/{session['id']}",
            amount_total=total,
            currency=currency,
            status="open",
            payment_status="unpaid",
            expires_at=int(time.time()) + 86400,
            payment_intent=None,
            subscription=None,
        )
        return status, session


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [pair for k, v in node.items() for pair in _flatten(v, f"{prefix}[{k}]" if prefix else k)]
    if isinstance(node, list):
        return [pair for i, v in enumerate(node) for pair in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, str(node))]
