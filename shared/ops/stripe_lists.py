"""A paced, budgeted reader of Stripe's list endpoints (`/v1/events`, `/v1/payment_intents`)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from shared.config import Settings

if TYPE_CHECKING:  # imported when a command runs: `paybus --help` stays fast
    import aiohttp

PAGE_SIZE: Final = 100
TRIES: Final = 4


class BudgetExhausted(Exception):
    """The request budget ran out before the last page."""


class StripeLists:
    """A paced reader of Stripe list endpoints; every request, retries included, counts against the budget."""

    def __init__(
        self, settings: Settings, session: aiohttp.ClientSession, max_requests: int, rate: float
    ) -> None:
        self._base = settings.stripe_api_base.rstrip("/")
        self._headers = {"Authorization": f"Bearer {settings.stripe_secret_key}"}
        if settings.stripe_api_version:
            self._headers["Stripe-Version"] = settings.stripe_api_version
        self._session = session
        self._max_requests = max_requests
        self._interval = 1.0 / rate
        self._last = 0.0
        self.requests = 0

    async def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        import aiohttp

        delay = 1.0
        for attempt in range(TRIES):
            if self.requests >= self._max_requests:
                raise BudgetExhausted()
            wait = self._last + self._interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last = time.monotonic()
            self.requests += 1
            try:
                async with self._session.get(
                    self._base + path, params=params, headers=self._headers
                ) as response:
                    if response.status == 200:
                        return dict(await response.json())
                    retry_after = response.headers.get("Retry-After", "")
                    text = (await response.text())[:300]
                    if response.status not in (429, 500, 502, 503, 504) or attempt == TRIES - 1:
                        raise RuntimeError(f"Stripe answered {response.status}: {text}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt == TRIES - 1:
                    raise RuntimeError(f"Stripe unreachable: {type(exc).__name__}") from None
                retry_after = ""
            await asyncio.sleep(float(retry_after) if retry_after.isdigit() else delay)
            delay *= 2
        raise AssertionError("unreachable")

    def use(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def list_all(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Every object of a Stripe list endpoint, following `starting_after` while `has_more`."""
        params = {**params, "limit": str(PAGE_SIZE)}
        found: list[dict[str, Any]] = []
        while True:
            page = await self._get(path, params)
            data = page.get("data") or []
            found.extend(e for e in data if isinstance(e, dict))
            if not page.get("has_more") or not data:
                return found
            params["starting_after"] = str(data[-1]["id"])

    async def undelivered(self, since: datetime) -> list[dict[str, Any]]:
        """Every event created since ``since`` that Stripe has not delivered."""
        return await self.list_all(
            "/v1/events", {"delivery_success": "false", "created[gte]": str(int(since.timestamp()))}
        )

    async def payment_intents(self, since: datetime) -> list[dict[str, Any]]:
        return await self.list_all("/v1/payment_intents", {"created[gte]": str(int(since.timestamp()))})


# Stripe's settled PaymentIntent states and the `payments.status` each must have become. Only final
# states are compared: a payment still in flight may lag by an undelivered event without being wrong.
SETTLED_INTENT_STATUS: Final = {"succeeded": "succeeded", "canceled": "canceled"}


def intent_drift(intents: list[dict[str, Any]], ours: dict[str, str]) -> list[dict[str, Any]]:
    """Settled PaymentIntents whose state in paybus differs from Stripe's."""
    drift = []
    for intent in intents:
        want = SETTLED_INTENT_STATUS.get(str(intent.get("status")))
        have = ours.get(str(intent.get("id")))
        if want and have != want:
            drift.append({"object": intent["id"], "stripe": intent["status"], "paybus": have or "missing"})
    return drift
