"""Payment requests from backend services: one module per kind, run by `dispatcher.RequestProcessor`."""

from __future__ import annotations

from processor.requests.base import KindHandler


def handlers() -> dict[str, KindHandler]:
    """The routing table: request kind -> its module's validate/handle pair."""
    from processor.requests import (
        checkout,
        payment_intent,
        portal,
        refund,
        subscription_cancel,
        subscription_change,
    )

    modules = (checkout, payment_intent, refund, portal, subscription_cancel, subscription_change)
    return {module.KIND: module.HANDLER for module in modules}
