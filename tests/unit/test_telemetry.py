"""The ingress's trace context without an exporter: ids flow on, nothing is recorded."""

from __future__ import annotations

import re

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shared.telemetry import PropagatingTracer, extract, inject, setup_tracing

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


def test_with_an_exporter_every_span_is_recorded() -> None:
    exporter = InMemorySpanExporter()
    provider = setup_tracing("ingress", exporter=exporter)
    with provider.get_tracer("t").start_as_current_span("POST /webhook/stripe") as span:
        assert span.is_recording()
    provider.force_flush()
    assert [s.name for s in exporter.get_finished_spans()] == ["POST /webhook/stripe"]


def test_the_processor_without_an_exporter_records_nothing_and_continues_the_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    processor = setup_tracing("processor").get_tracer("t")
    parent = extract({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    with processor.start_as_current_span("process", context=parent) as span:
        assert not span.is_recording()
        assert f"{span.get_span_context().trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
