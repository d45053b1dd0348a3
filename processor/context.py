"""What handlers need besides the connection: catalog, grace period, clock."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec

from processor.catalog import Catalog


def utcnow() -> datetime:
    return datetime.now(UTC)


class Context(msgspec.Struct, frozen=True, kw_only=True):
    catalog: Catalog
    grace: timedelta = timedelta(days=3)
    clock: Callable[[], datetime] = utcnow
