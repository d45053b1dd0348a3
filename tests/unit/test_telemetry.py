"""The ingress's trace context without an exporter: ids flow on, nothing is recorded."""

from __future__ import annotations

import re

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from shared.telemetry import PropagatingTracer, extract, inject

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")


def test_spans_record_nothing_but_inject_a_sampled_traceparent() -> None:
    tracer = PropagatingTracer()
    with tracer.start_as_current_span("POST /webhook/stripe", kind=SpanKind.SERVER) as server:
        assert not server.is_recording()
        with tracer.start_as_current_span("publish", kind=SpanKind.PRODUCER) as producer:
            headers = inject({})
    match = TRACEPARENT.fullmatch(headers["traceparent"])
    assert match, headers
    server_ctx, producer_ctx = server.get_span_context(), producer.get_span_context()
    assert producer_ctx.trace_id == server_ctx.trace_id == int(match[1], 16), "one trace per request"
    assert producer_ctx.span_id != server_ctx.span_id
    assert int(match[2], 16) == producer_ctx.span_id
    assert not trace.get_current_span().get_span_context().is_valid, "context restored after the request"


def test_each_request_starts_its_own_trace_and_a_remote_parent_is_continued() -> None:
    tracer = PropagatingTracer()
    ids = set()
    for _ in range(3):
        with tracer.start_as_current_span("request") as span:
            ids.add(span.get_span_context().trace_id)
    assert len(ids) == 3

    parent = extract({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    with tracer.start_as_current_span("child", context=parent) as child:
        assert f"{child.get_span_context().trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
