"""Signature verification agrees with Stripe's own SDK and refuses everything else."""

from __future__ import annotations

import time

import pytest
import stripe

from ingress.signature import BadSignature, sign, signature_header, verify

SECRET = "whsec_unit_secret_one"
OTHER = "whsec_unit_secret_two"
BODY = b'{"id":"evt_1","object":"event"}'


def test_accepts_a_header_made_by_the_stripe_sdk() -> None:
    now = int(time.time())
    header = stripe.WebhookSignature.generate_signature_header(BODY.decode(), SECRET, timestamp=now)
    assert verify(BODY, header, [SECRET], now=now) == now


def test_our_signature_passes_the_stripe_sdk_check() -> None:
    now = int(time.time())
    assert stripe.WebhookSignature.verify_header(
        BODY, signature_header(BODY, SECRET, now), SECRET, tolerance=300
    )


def test_any_configured_secret_may_match() -> None:
    now = int(time.time())
    assert verify(BODY, signature_header(BODY, OTHER, now), [SECRET, OTHER], now=now) == now


def test_second_v1_may_be_the_valid_one() -> None:
    now = int(time.time())
    header = f"t={now},v1={sign(BODY, 'whsec_old', now)},v1={sign(BODY, SECRET, now)}"
    assert verify(BODY, header, [SECRET], now=now) == now


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing"),
        ("", "missing"),
        ("garbage", "no timestamp"),
        ("t=abc,v1=00", "malformed"),
        ("v1=00", "no timestamp"),
        ("t=NOW", "no v1"),
        ("t=NOW,v0=V0SIG", "no v1"),
        ("t=NOW,v1=deadbeef", "no v1 signature matches"),
        ("t=NOW,v1=ünïcode", "no v1 signature matches"),
    ],
)
def test_bad_headers_are_refused_with_a_reason(header: str | None, message: str) -> None:
    now = int(time.time())
    if header:
        header = header.replace("NOW", str(now)).replace("V0SIG", sign(BODY, SECRET, now))
    with pytest.raises(BadSignature, match=message):
        verify(BODY, header, [SECRET], now=now)


def test_wrong_secret_is_refused() -> None:
    now = int(time.time())
    with pytest.raises(BadSignature):
        verify(BODY, signature_header(BODY, OTHER, now), [SECRET], now=now)


def test_timestamp_older_than_300_seconds_is_refused() -> None:
    now = int(time.time())
    verify(BODY, signature_header(BODY, SECRET, now - 300), [SECRET], now=now)
    with pytest.raises(BadSignature, match="tolerance"):
        verify(BODY, signature_header(BODY, SECRET, now - 301), [SECRET], now=now)


def test_a_changed_body_is_refused() -> None:
    now = int(time.time())
    with pytest.raises(BadSignature):
        verify(BODY + b" ", signature_header(BODY, SECRET, now), [SECRET], now=now)
