"""The event loop both services run on (`PAYBUS_EVENT_LOOP`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """A maker of new event loops of ``kind``: "uvloop" or "asyncio"."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """ "uvloop" or "asyncio": which loop a service really runs on (its start-up log line says)."""
    return type(loop).__module__.split(".")[0]
