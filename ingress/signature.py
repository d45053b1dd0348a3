"""Stripe-Signature verification (v1 = HMAC-SHA256 over "{t}.{body}"); pure, no I/O."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Final

TOLERANCE_SECONDS: Final = 300


class BadSignature(Exception):
    """The request is not signed by any configured secret; the message is safe to show the sender."""

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The v1 signature Stripe would send for ``body`` at ``timestamp``."""
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(body: bytes, secret: str, timestamp: int) -> str:
    return f"t={timestamp},v1={sign(body, secret, timestamp)}"


def verify(
    body: bytes,
    header: str | None,
    secrets: Sequence[str],
    now: float,
    tolerance: int = TOLERANCE_SECONDS,
) -> int:
    """Return the signed timestamp if any ``v1`` matches any secret; raise BadSignature otherwise.

    Other schemes (Stripe's test-only ``v0``) are ignored to prevent downgrades. Only timestamps
    older than the tolerance are refused, as Stripe's own libraries do.
    """
    if not header:
        raise BadSignature("missing Stripe-Signature header")
    timestamp: int | None = None
    candidates: list[bytes] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise BadSignature("malformed Stripe-Signature timestamp") from None
        elif key == "v1":
            candidates.append(value.encode("utf-8", "replace"))
    if timestamp is None:
        raise BadSignature("Stripe-Signature has no timestamp")
    if not candidates:
        raise BadSignature("Stripe-Signature has no v1 signature")
    matched = False
    for secret in secrets:
        expected = sign(body, secret, timestamp).encode()
        for candidate in candidates:
            # compare every pair, so timing says nothing about which secret or position matched
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise BadSignature("no v1 signature matches")
    if timestamp < now - tolerance:
        raise BadSignature("timestamp outside the tolerance", stale=True)
    return timestamp
