"""`paybus request KIND ...`: publish one payment request as a backend service would and print the reply."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import msgspec

from shared.amqp import REQUEST_KINDS

# option -> request field, for the fields that are not plain strings
_INT_FIELDS = ("amount", "quantity")
_STRING_FIELDS = (
    "mode",
    "product",
    "currency",
    "description",
    "success_url",
    "cancel_url",
    "email",
    "name",
    "payment_method",
    "payment_id",
    "payment_intent_id",
    "reason",
    "return_url",
    "subscription_id",
    "proration_behavior",
)


def add_request_command(sub: Any) -> None:
    """Register the `request` subcommand on the `paybus` parser's subparsers."""
    parser = sub.add_parser(
        "request",
        help="publish a payment request and print the reply (what a backend service does)",
        description="Publish a payment request to paybus.requests and print the reply JSON. "
        "Exit status: 0 ok, 1 the reply is an error, 2 no reply (connection problem or timeout).",
    )
    parser.add_argument("kind", metavar="KIND", help="one of: " + ", ".join(REQUEST_KINDS))
    parser.add_argument("--user", required=True, help="the user's UUID")
    parser.add_argument("--key", required=True, help="idempotency key (repeat it to get the same answer)")
    parser.add_argument("--amount", type=int, help="minor units (paise, cents)")
    parser.add_argument("--quantity", type=int)
    parser.add_argument("--currency")
    parser.add_argument("--product", help="catalog product key")
    parser.add_argument("--mode", choices=["payment", "subscription"], help="checkout mode")
    parser.add_argument("--description", help="line item name for a dynamic amount")
    parser.add_argument("--success-url", dest="success_url")
    parser.add_argument("--cancel-url", dest="cancel_url")
    parser.add_argument("--return-url", dest="return_url")
    parser.add_argument("--email")
    parser.add_argument("--name")
    parser.add_argument("--payment-method", dest="payment_method", help="a pm_... to attach")
    parser.add_argument(
        "--confirm", action="store_true", default=None, help="confirm the PaymentIntent at once"
    )
    parser.add_argument("--payment-id", dest="payment_id", help="refund: paybus payment UUID")
    parser.add_argument("--payment-intent-id", dest="payment_intent_id", help="refund: pi_...")
    parser.add_argument("--reason", help="refund reason")
    parser.add_argument("--subscription-id", dest="subscription_id")
    parser.add_argument("--at-period-end", dest="at_period_end", action="store_true", default=None)
    parser.add_argument("--now", dest="at_period_end", action="store_false", help="cancel immediately")
    parser.add_argument("--proration-behavior", dest="proration_behavior")
    parser.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="repeatable")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply")
    parser.set_defaults(func=cmd_request)


def build_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": args.kind, "idempotency_key": args.key, "user_id": args.user}
    for field in (*_INT_FIELDS, *_STRING_FIELDS, "confirm", "at_period_end"):
        value = getattr(args, field, None)
        if value is not None:
            body[field] = value
    if args.metadata:
        body["metadata"] = dict(item.partition("=")[::2] for item in args.metadata)
    return body


def cmd_request(args: argparse.Namespace) -> int:
    from shared.cli import _settings
    from shared.client import PaymentRequestError, PaymentsClient, RequestTimeout

    settings = _settings()
    body = json.dumps(build_body(args)).encode()

    async def send() -> dict[str, Any]:
        async with await PaymentsClient.connect(settings.amqp_url, reply_timeout=args.timeout) as client:
            reply = await client.send(args.kind, body)
        printable: dict[str, Any] = msgspec.to_builtins(reply)
        return printable

    try:
        reply = asyncio.run(send())
    except RequestTimeout as exc:
        print(f"paybus request: {exc}; repeat with the same --key to get the answer", file=sys.stderr)
        return 2
    except (PaymentRequestError, OSError, ConnectionError) as exc:
        print(f"paybus request: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1
