"""Errors named by what the consumer does next."""

from __future__ import annotations


class Retry(Exception):
    """Transient: try again later through the retry queues."""


class Reject(Exception):
    """Permanent: the message can never succeed as it is; dead-letter it with ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class DatabaseUnavailable(Exception):
    """Postgres is unreachable: take no work until it is back (nothing acked, nothing dead-lettered)."""
