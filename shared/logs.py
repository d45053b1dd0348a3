"""Structured JSON logs; a redaction filter keeps secrets, signatures, emails and card data out."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Final

from shared.telemetry import current_ids

# One alternation, so each log line is scanned once (this runs for every webhook).
_SENSITIVE: Final = re.compile(
    r"(?P<whsec>whsec_[A-Za-z0-9_]+)"
    r"|(?P<key>(?:sk|rk)_(?:test|live)_[A-Za-z0-9_]+)"
    r"|(?P<client_secret>pi_[A-Za-z0-9]+_secret_[A-Za-z0-9]+)"
    r"|(?P<signature>\bv[01]=[0-9a-f]{16,})"
    r"|(?P<email>[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,})"
    r"|(?P<pan>\b(?:\d[ -]?){13,19}\b)"
)
_FIXED: Final = {
    "whsec": "whsec_[REDACTED]",
    "client_secret": "[REDACTED_CLIENT_SECRET]",
    "signature": "v1=[REDACTED]",
    "email": "[REDACTED_EMAIL]",
    "pan": "[REDACTED_PAN]",
}


def _replace(match: re.Match[str]) -> str:
    kind = match.lastgroup or ""
    if kind == "key":  # keep which kind of key it was: sk_live_… -> sk_live_[REDACTED]
        return "_".join(match.group().split("_", 2)[:2]) + "_[REDACTED]"
    return _FIXED[kind]


_EXTRA_FIELDS: Final = ("event_id", "event_type", "request_kind", "idempotency_key", "trace_id", "span_id")


def redact(text: str) -> str:
    return _SENSITIVE.sub(_replace, text)


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
