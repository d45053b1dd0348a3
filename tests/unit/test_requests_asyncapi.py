"""The AsyncAPI document agrees with the msgspec structs: schemas, kinds, references, examples."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from shared import asyncapi
from shared import messages as m
from shared.amqp import REQUEST_KINDS

DOC: dict[str, Any] = json.loads(asyncapi.DOCUMENT.read_text())


def test_the_committed_document_is_what_the_code_generates() -> None:
    assert asyncapi.build() == DOC, "shared/asyncapi.json is stale: run `python -m shared.asyncapi --write`"


def test_schemas_are_exactly_the_msgspec_structs() -> None:
    types: list[Any] = [*m.REQUEST_TYPES, m.Reply, *m.RESULT_OF.values(), *asyncapi._domain_event_types()]
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    assert DOC["components"]["schemas"] == components


def test_it_is_an_asyncapi_3_document_with_every_request_kind_and_its_reply() -> None:
    assert DOC["asyncapi"] == "3.0.0"
    requests = DOC["channels"]["paymentRequests"]
    assert requests["address"] == "paybus.requests"
    kinds = {DOC["components"]["messages"][name]["name"] for name in requests["messages"]}
    assert kinds == set(REQUEST_KINDS) == set(m.TYPE_OF)
    replied = [op for op in DOC["operations"].values() if op["action"] == "send"]
    assert len(replied) == len(REQUEST_KINDS)
    assert all(op["reply"]["channel"] == {"$ref": "#/channels/paymentReplies"} for op in replied)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_reference_resolves() -> None:
    refs = _refs(DOC)
    assert refs
    for ref in refs:
        node: Any = DOC
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, f"unresolved {ref}"
            node = node[part]


def test_the_examples_are_valid_messages() -> None:
    for message in DOC["components"]["messages"].values():
        for example in message.get("examples", []):
            payload = json.dumps(example["payload"]).encode()
            if message["name"] == "paybus.reply":
                assert m.decode_reply(payload).ok in (True, False)
            else:
                request = m.decode_request(payload, message["name"])
                assert m.kind_of(request) == message["name"]
