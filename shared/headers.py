"""AMQP header names paybus writes on failed, retried and dead-lettered messages (DESIGN §5)."""

from __future__ import annotations

from typing import Final

H_ATTEMPTS: Final = "x-paybus-attempts"
H_REASON: Final = "x-paybus-reason"
H_ERROR: Final = "x-paybus-error"
H_FIRST_FAILED: Final = "x-paybus-first-failed-at"
H_DEAD_LETTERED: Final = "x-paybus-dead-lettered-at"
H_ORIGINAL_EXCHANGE: Final = "x-paybus-original-exchange"
H_ORIGINAL_KEY: Final = "x-paybus-original-routing-key"
H_ORIGINAL_QUEUE: Final = "x-paybus-original-queue"
H_REQUEUED_AT: Final = "x-paybus-requeued-at"
H_REQUEUE_COUNT: Final = "x-paybus-requeue-count"
