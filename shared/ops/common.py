"""Small helpers shared by the operator commands: time windows, settings, output."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from shared.config import ConfigError, Settings, load_settings

_DURATION: Final = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class UsageError(ValueError):
    """A bad argument value; the message is shown to the operator as is."""


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `12h`, `3d`, `2w` → a timedelta."""
    match = _DURATION.match(text)
    if not match:
        raise UsageError(f"{text!r} is not a duration such as 30m, 12h or 3d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A duration back from now (`3d`) or an ISO-8601 instant (`2026-11-20T10:00:00Z`), as aware UTC."""
    now = now or datetime.now(UTC)
    if _DURATION.match(text):
        return now - parse_duration(text)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{text!r} is neither a duration (30m, 12h, 3d) nor an ISO-8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def settings_or_exit(command: str) -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"paybus {command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def fail(command: str, message: str, code: int = 1) -> int:
    print(f"paybus {command}: {message}", file=sys.stderr)
    return code


def iso(value: datetime | None) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds") if value else "-"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Plain left-aligned columns; the last column is never padded."""
    cells = [[str(h) for h in header], *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(widths[i]) if i < len(header) - 1 else c for i, c in enumerate(row)).rstrip()
        for row in cells
    )


def dump_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)
