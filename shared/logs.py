"""Structured JSON logs; a redaction filter keeps secrets, signatures, emails and card data out."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Final

from shared.telemetry import current_ids

_REDACTIONS: Final = (
    (re.compile(r"whsec_[A-Za-z0-9_]+"), "whsec_[REDACTED]"),
    (re.compile(r"(sk|rk)_(test|live)_[A-Za-z0-9_]+"), r"\1_\2_[REDACTED]"),
    (re.compile(r"pi_[A-Za-z0-9]+_secret_[A-Za-z0-9]+"), "[REDACTED_CLIENT_SECRET]"),
    (re.compile(r"\bv[01]=[0-9a-f]{16,}"), "v1=[REDACTED]"),
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[REDACTED_EMAIL]"),
    (re.compile(r"\b(?:\d[ -]?){13,19}\b"), "[REDACTED_PAN]"),
)
_EXTRA_FIELDS: Final = ("event_id", "event_type", "request_kind", "idempotency_key", "trace_id", "span_id")


def redact(text: str) -> str:
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        ids = current_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = redact(str(value))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aio_pika", "aiormq", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
