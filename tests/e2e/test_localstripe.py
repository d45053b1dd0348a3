"""An outside client: localstripe (a fake Stripe that signs its webhooks) drives a payment to `succeeded`."""

from __future__ import annotations

import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import stripe

from tests.e2e.conftest import Stack
from tests.support import TEST_SECRET, free_port, wait_for, wait_for_sync


@pytest.fixture
def localstripe(tmp_path: Path) -> Iterator[str]:
    """localstripe as its own process (it is GPL: run, never imported)."""
    port = free_port()
    exe = Path(sys.executable).parent / "localstripe"
    with (tmp_path / "localstripe.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(exe), "--port", str(port), "--from-scratch"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                urllib.request.urlopen(f"{url}/v1/customers", timeout=1)  # noqa: S310
            except urllib.error.HTTPError:
                return True  # answering (401 without a key) is enough
            except OSError:
                return False
            return True

        wait_for_sync(up, timeout=20)
        yield url
        proc.terminate()
        proc.wait(timeout=10)


def _register_webhook(localstripe: str, url: str) -> None:
    data = urllib.parse.urlencode({"url": url, "secret": TEST_SECRET}).encode()
    request = urllib.request.Request(f"{localstripe}/_config/webhooks/paybus", data=data, method="POST")  # noqa: S310
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        assert response.status == 200


async def test_payment_confirmed_in_localstripe_reaches_succeeded_through_the_pipeline(
    stack_factory: Callable[..., Stack],
    make_vhost: Callable[[], str],
    localstripe: str,
    conn: psycopg.AsyncConnection[Any],
) -> None:
    stack = stack_factory(make_vhost(), WEBHOOK_PATH_TOKEN="ls-token")
    stack.start_ingress()
    stack.start_processor()
    _register_webhook(localstripe, stack.webhook_url)

    client = stripe.StripeClient(
        "sk_test_localstripe", base_addresses={"api": localstripe}, max_network_retries=0
    )
    user = "7d3f7c8e-3333-4a5b-9c9d-000000000003"
    card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"}
    method = client.v1.payment_methods.create({"type": "card", "card": card})
    intent = client.v1.payment_intents.create(
        {"amount": 129900, "currency": "inr", "payment_method": method.id, "metadata": {"user_id": user}}
    )
    assert client.v1.payment_intents.confirm(intent.id).status == "succeeded"

    async def status() -> Any:
        row = await (
            await conn.execute(
                "SELECT status, user_id::text, amount FROM payments WHERE stripe_payment_intent_id = %s",
                (intent.id,),
            )
        ).fetchone()
        return row if row and row[0] == "succeeded" else None

    assert await wait_for(status, timeout=30) == ("succeeded", user, 129900)
    # the events came from localstripe's own signer, not ours
    sources = await (
        await conn.execute(
            "SELECT DISTINCT api_version FROM stripe_events WHERE object_id = %s", (intent.id,)
        )
    ).fetchall()
    assert sources == [("2017-08-15",)]
