"""The processor's connection pool check: test a connection on checkout only after it sat idle.

After a Postgres restart every pooled connection is dead, so the pool tests each one as it hands it
out (`AsyncConnectionPool.check_connection`, an empty query). Under load that is one round trip per
batch for nothing: a connection returned a moment ago was working a moment ago. `IdleCheck` skips the
test for a connection back in the pool for less than `fresh` seconds. A restart inside that window
fails the batch on its first statement, as a restart during the batch would: the consumer waits for
the database while it is down and then takes the same messages again (were it already back, they
would go through a retry delay, `processor.consumer`).
"""

from __future__ import annotations

import time
from typing import Any, Final
from weakref import WeakKeyDictionary

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

FRESH_SECONDS: Final = 1.0


class IdleCheck:
    """`check=` and `reset=` for one `AsyncConnectionPool`."""

    def __init__(self, fresh: float = FRESH_SECONDS) -> None:
        self._fresh = fresh
        self._returned: WeakKeyDictionary[AsyncConnection[Any], float] = WeakKeyDictionary()
        self.tested = 0  # how many checkouts ran the test (for the tests)

    async def reset(self, conn: AsyncConnection[Any]) -> None:
        self._returned[conn] = time.monotonic()

    async def check(self, conn: AsyncConnection[Any]) -> None:
        returned = self._returned.pop(conn, None)
        if returned is not None and time.monotonic() - returned < self._fresh:
            return
        self.tested += 1
        await AsyncConnectionPool.check_connection(conn)
