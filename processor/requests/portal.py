"""portal_session.create: a Stripe billing portal session where the user manages cards and subscriptions."""

from __future__ import annotations

from typing import Any, Final

from psycopg import AsyncConnection

from processor.requests.base import Deps, Done, KindHandler, no_checks
from shared.messages import PortalSessionCreate, PortalSessionResult, success

KIND: Final = "portal_session.create"


async def handle(
    conn: AsyncConnection[Any], request: PortalSessionCreate, deps: Deps, customer_id: str | None
) -> Done:
    params = {"customer": customer_id, "return_url": request.return_url or deps.settings.portal_return_url}
    session = await deps.stripe.create_portal_session(params, f"paybus:{request.idempotency_key}:portal")
    return Done(
        success(PortalSessionResult(url=str(session["url"]), portal_session_id=session["id"])), session["id"]
    )


HANDLER: Final = KindHandler(validate=no_checks, handle=handle, needs_customer=True)
