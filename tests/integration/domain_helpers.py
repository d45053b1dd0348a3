"""Helpers for the domain tests: apply Stripe events in-process, exactly as the processor's pipeline does."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import psycopg

from processor.catalog import Catalog, load_catalog
from processor.context import Context
from processor.events import decode_event, handlers
from processor.ledger import Result, apply_event, transaction
from shared import samples
from shared.config import REPO_ROOT

CATALOG: Catalog = load_catalog(REPO_ROOT / "catalog.toml")
CTX = Context(catalog=CATALOG, grace=timedelta(days=3))
HANDLERS = handlers()
PRO_PRICE = CATALOG.products["pro_monthly"].price_id
TEAM_PRICE = CATALOG.products["team_monthly"].price_id

Conn = psycopg.AsyncConnection[Any]


async def deliver(conn: Conn, envelope: dict[str, Any], ctx: Context = CTX) -> Result:
    """One delivery: ledger row + effect in one transaction, like `EventPipeline.process`."""
    body = samples.encode(envelope)
    async with transaction(conn):
        return await apply_event(conn, body, decode_event(body), HANDLERS, ctx)


def user() -> str:
    return str(uuid.uuid4())


async def one(conn: Conn, query: str, *params: Any) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    await cur.execute(query, params)
    return await cur.fetchone()


async def rows(conn: Conn, query: str, *params: Any) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    await cur.execute(query, params)
    return await cur.fetchall()


async def active_features(conn: Conn, user_id: str) -> set[str]:
    found = await rows(conn, "SELECT feature FROM active_entitlements WHERE user_id = %s", user_id)
    return {r["feature"] for r in found}


async def outbox_types(conn: Conn, user_id: str) -> list[str]:
    found = await rows(conn, "SELECT event_type FROM outbox WHERE user_id = %s ORDER BY seq", user_id)
    return [r["event_type"] for r in found]
