"""Stripe SDK errors become the reply codes of DESIGN §6: definite answers, or transient ones to retry."""

from __future__ import annotations

import stripe

from processor.errors import Retry
from processor.stripe_api import StripeFailure, StripeTransient, classify


def test_network_trouble_and_stripe_5xx_are_transient() -> None:
    for error in (
        stripe.APIConnectionError("connection reset"),
        stripe.APIError("boom", http_status=500),
        stripe.InvalidRequestError("in use", param=None, code="idempotency_key_in_use", http_status=409),
    ):
        mapped = classify(error)
        assert isinstance(mapped, StripeTransient) and isinstance(mapped, Retry)
        assert mapped.code == "stripe_unavailable"


def test_rate_limits_are_transient_rate_limited() -> None:
    mapped = classify(stripe.RateLimitError("slow down", http_status=429))
    assert isinstance(mapped, StripeTransient) and mapped.code == "rate_limited"


def test_a_declined_card_is_card_declined_with_the_decline_code() -> None:
    body = {
        "error": {
            "type": "card_error",
            "code": "card_declined",
            "decline_code": "insufficient_funds",
            "message": "Your card has insufficient funds.",
        }
    }
    error = stripe.CardError(
        "Your card has insufficient funds.", None, "card_declined", http_status=402, json_body=body
    )
    mapped = classify(error)
    assert isinstance(mapped, StripeFailure)
    assert (mapped.code, mapped.decline_code, mapped.retryable) == (
        "card_declined",
        "insufficient_funds",
        False,
    )


def test_missing_objects_are_not_found_and_bad_parameters_invalid_request() -> None:
    missing = classify(
        stripe.InvalidRequestError(
            "No such subscription: 'sub_1'", "id", code="resource_missing", http_status=404
        )
    )
    assert isinstance(missing, StripeFailure) and missing.code == "not_found"
    bad = classify(
        stripe.InvalidRequestError(
            "Amount must be at least ₹0.50 inr",
            "amount",
            http_status=400,
            json_body={"error": {"message": "Amount must be at least ₹0.50 inr"}},
        )
    )
    assert isinstance(bad, StripeFailure) and bad.code == "invalid_request"
    assert "Amount must be at least" in bad.message


def test_auth_errors_do_not_leak_the_key_and_may_be_retried_later() -> None:
    mapped = classify(
        stripe.AuthenticationError("Invalid API Key provided: sk_live_abcdef123456", http_status=401)
    )
    assert isinstance(mapped, StripeFailure) and mapped.code == "stripe_error" and mapped.retryable is True
    assert "sk_live" not in mapped.message


def test_stripe_messages_are_redacted() -> None:
    text = "No such customer for buyer@example.com using sk_test_abcdef1234567890"
    mapped = classify(
        stripe.InvalidRequestError(text, "customer", http_status=400, json_body={"error": {"message": text}})
    )
    assert "@example.com" not in mapped.message and "sk_test_abcdef" not in mapped.message


def test_idempotency_conflicts_at_stripe_are_invalid_request() -> None:
    mapped = classify(
        stripe.IdempotencyError(
            "Keys for idempotent requests can only be used with the same parameters", http_status=400
        )
    )
    assert isinstance(mapped, StripeFailure) and mapped.code == "invalid_request"
