"""The log redaction filter: the safety net for anything sensitive that reaches a log call."""

from __future__ import annotations

import json
import logging

import pytest

from shared.logs import JsonFormatter, redact


@pytest.mark.parametrize(
    ("text", "secret", "shown"),
    [
        ("secret whsec_abcDEF123_x in config", "whsec_abcDEF123_x", "whsec_[REDACTED]"),
        ("key sk_live_51HxYz0123 failed", "sk_live_51HxYz0123", "sk_live_[REDACTED]"),
        ("key rk_test_abc", "rk_test_abc", "rk_test_[REDACTED]"),
        ("pi_3AbC_secret_XyZ123 leaked", "pi_3AbC_secret_XyZ123", "[REDACTED_CLIENT_SECRET]"),
        ("t=1,v1=5257a869e7ecebeda32affa62cdca3fa", "5257a869e7ecebeda32affa62cdca3fa", "v1=[REDACTED]"),
        ("mail jenny.rosen@example.com now", "jenny.rosen@example.com", "[REDACTED_EMAIL]"),
        ("card 4242 4242 4242 4242 declined", "4242 4242 4242 4242", "[REDACTED_PAN]"),
        ("card 4000000000000002 declined", "4000000000000002", "[REDACTED_PAN]"),
    ],
)
def test_each_kind_of_secret_is_redacted(text: str, secret: str, shown: str) -> None:
    out = redact(text)
    assert secret not in out and shown in out


def test_ordinary_text_is_untouched() -> None:
    text = "webhook accepted evt_1PgafyB7WZ01zgkW type payment_intent.succeeded amount 49900"
    assert redact(text) == text


def test_the_formatter_redacts_message_extras_and_tracebacks() -> None:
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "failed for %s", ("a@b.io",), None)
    record.event_type = "x sk_test_123"
    try:
        raise ValueError("whsec_inside_a_traceback")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert "a@b.io" not in line and "sk_test_123" not in line and "whsec_inside" not in line
    assert entry["msg"] == "failed for [REDACTED_EMAIL]"
    assert entry["event_type"] == "x sk_test_[REDACTED]"
