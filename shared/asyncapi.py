"""The AsyncAPI 3 document of paybus's messages, generated from the msgspec structs so the two cannot drift.

`shared/asyncapi.json` is this module's output, committed for readers and tools (AsyncAPI Studio,
generators). After changing a message struct run `python -m shared.asyncapi --write`; a test fails
while the committed document differs from what the code says.
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any, Final

import msgspec

from shared import messages as m
from shared.amqp import DOMAIN_EXCHANGE, REQUEST_KINDS, REQUESTS_EXCHANGE, REQUESTS_QUEUE

DOCUMENT: Final = Path(__file__).with_name("asyncapi.json")
REF: Final = "#/components/schemas/{name}"
EXAMPLE_USER: Final = uuid.UUID("5b0c1f4e-8a53-4d0c-9a4a-0d4f6c2b9e11")

REQUEST_EXAMPLES: Final[dict[str, m.Request]] = {
    "checkout_session.create": m.CheckoutSessionCreate(
        idempotency_key="order-1042-checkout",
        user_id=EXAMPLE_USER,
        product="pro_monthly",
        mode="subscription",
    ),
    "payment_intent.create": m.PaymentIntentCreate(
        idempotency_key="order-1043-pay",
        user_id=EXAMPLE_USER,
        amount=49900,
        currency="inr",
        product="lifetime_reports",
    ),
    "refund.create": m.RefundCreate(
        idempotency_key="order-1043-refund-1",
        user_id=EXAMPLE_USER,
        payment_intent_id="pi_3PgafmB7WZ01zgkW",
        amount=10000,
        reason="requested_by_customer",
    ),
    "portal_session.create": m.PortalSessionCreate(
        idempotency_key="portal-2026-11-26-a",
        user_id=EXAMPLE_USER,
        return_url="https://app.example.com/account",
    ),
    "subscription.cancel": m.SubscriptionCancel(
        idempotency_key="cancel-sub-1",
        user_id=EXAMPLE_USER,
        subscription_id="sub_1PgafmB7WZ01zgkW",
        at_period_end=True,
    ),
    "subscription.change": m.SubscriptionChange(
        idempotency_key="upgrade-sub-1",
        user_id=EXAMPLE_USER,
        subscription_id="sub_1PgafmB7WZ01zgkW",
        product="team_monthly",
    ),
}
REPLY_EXAMPLES: Final[list[m.Reply]] = [
    m.success(
        m.PortalSessionResult(
            url="https://billing.stripe.com/p/session/test_YWNjdF8x", portal_session_id="bps_1PgafmB7WZ01zgkW"
        )
    ),
    m.failure("invalid_request", "unsupported currency 'xyz'; supported: aed, aud, ..."),
    m.failure(
        "stripe_unavailable",
        "Stripe could not be reached; retries exhausted, try again later",
        retryable=True,
    ),
]


def _domain_event_types() -> tuple[type[msgspec.Struct], ...]:
    """The domain events of `paybus.events`, when the module that defines them is present."""
    try:
        from shared import domain_events  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return ()
    return tuple(domain_events.DOMAIN_EVENT_TYPES)


def _name(kind: str) -> str:
    return "".join(part.capitalize() for part in kind.replace(".", "_").split("_"))


def schemas() -> dict[str, Any]:
    """components.schemas: every struct of the contract, as msgspec describes it."""
    types: list[Any] = [*m.REQUEST_TYPES, m.Reply, *m.RESULT_OF.values(), *_domain_event_types()]
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    return components


def build() -> dict[str, Any]:
    component_messages: dict[str, Any] = {}
    request_refs: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for kind in REQUEST_KINDS:
        request_type = m.TYPE_OF[kind]
        name = request_type.__name__
        component_messages[name] = {
            "name": kind,
            "title": name,
            "summary": (request_type.__doc__ or kind).strip().splitlines()[0],
            "contentType": "application/json",
            "correlationId": {"$ref": "#/components/correlationIds/correlationId"},
            "payload": {"$ref": REF.format(name=name)},
            "bindings": {"amqp": {"messageType": kind, "deliveryMode": 2, "bindingVersion": "0.3.0"}},
            "examples": [{"name": kind, "payload": msgspec.to_builtins(REQUEST_EXAMPLES[kind])}],
            "x-paybus-result": {"$ref": REF.format(name=m.RESULT_OF[kind].__name__)},
        }
        request_refs[name] = {"$ref": f"#/components/messages/{name}"}
        operations[_name(kind)[0].lower() + _name(kind)[1:]] = {
            "action": "send",
            "title": f"Request {kind}",
            "summary": f"Publish with routing key `{kind}`, a `reply_to` queue and a `correlation_id`; "
            f"the reply's `result` is a {m.RESULT_OF[kind].__name__}.",
            "channel": {"$ref": "#/channels/paymentRequests"},
            "messages": [{"$ref": f"#/channels/paymentRequests/messages/{name}"}],
            "reply": {
                "address": {
                    "location": "$message.header#/reply_to",
                    "description": "the requester's exclusive reply queue",
                },
                "channel": {"$ref": "#/channels/paymentReplies"},
                "messages": [{"$ref": "#/channels/paymentReplies/messages/Reply"}],
            },
        }
    component_messages["Reply"] = {
        "name": "paybus.reply",
        "title": "Reply",
        "summary": "The answer to every request: ok + result, or ok=false + error (code, message, "
        "retryable).",
        "contentType": "application/json",
        "correlationId": {"$ref": "#/components/correlationIds/correlationId"},
        "payload": {"$ref": REF.format(name="Reply")},
        "examples": [{"payload": msgspec.to_builtins(reply)} for reply in REPLY_EXAMPLES],
    }
    event_refs: dict[str, Any] = {}
    for event_type in _domain_event_types():
        name = event_type.__name__
        routing_key = str(event_type.__struct_config__.tag)
        component_messages[name] = {
            "name": routing_key,
            "title": name,
            "contentType": "application/json",
            "payload": {"$ref": REF.format(name=name)},
            "bindings": {"amqp": {"messageType": routing_key, "deliveryMode": 2, "bindingVersion": "0.3.0"}},
        }
        event_refs[name] = {"$ref": f"#/components/messages/{name}"}
    channels: dict[str, Any] = {
        "paymentRequests": {
            "address": REQUESTS_EXCHANGE,
            "title": "Payment requests",
            "description": f"Direct exchange, routing key = request kind, consumed by the processor from "
            f"`{REQUESTS_QUEUE}`. Unknown kinds reach the same queue through the alternate exchange and are "
            "answered `invalid_request`.",
            "messages": request_refs,
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": REQUESTS_EXCHANGE,
                        "type": "direct",
                        "durable": True,
                        "autoDelete": False,
                    },
                    "bindingVersion": "0.3.0",
                }
            },
        },
        "paymentReplies": {
            "address": None,
            "title": "Replies",
            "description": "Published to the default exchange with routing key = the request's reply_to.",
            "messages": {"Reply": {"$ref": "#/components/messages/Reply"}},
        },
    }
    if event_refs:
        channels["domainEvents"] = {
            "address": DOMAIN_EXCHANGE,
            "title": "Domain events",
            "description": "Topic exchange, routing key = event type; message_id = the event id "
            "(dedupe on it).",
            "messages": event_refs,
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": DOMAIN_EXCHANGE,
                        "type": "topic",
                        "durable": True,
                        "autoDelete": False,
                    },
                    "bindingVersion": "0.3.0",
                }
            },
        }
        operations["receiveDomainEvents"] = {
            "action": "receive",
            "title": "Receive domain events",
            "channel": {"$ref": "#/channels/domainEvents"},
            "messages": [{"$ref": f"#/channels/domainEvents/messages/{n}"} for n in event_refs],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "paybus messages",
            "version": "0.1.0",
            "description": "Payment requests from backend services and their replies (DESIGN §6), and the "
            "domain events paybus publishes (DESIGN §8). The same idempotency_key always yields the same "
            "Stripe object and the same reply.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "development": {"host": "localhost:5672", "protocol": "amqp", "protocolVersion": "0.9.1"}
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": component_messages,
            "schemas": schemas(),
            "correlationIds": {
                "correlationId": {
                    "location": "$message.header#/correlation_id",
                    "description": "AMQP correlation_id property, echoed on the reply",
                }
            },
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--write", action="store_true", help=f"write {DOCUMENT.name} instead of printing it")
    args = parser.parse_args()
    if args.write:
        DOCUMENT.write_text(render())
    else:
        print(render(), end="")


if __name__ == "__main__":
    main()
