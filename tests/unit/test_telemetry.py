"""Tracing set-up: without an exporter spans are not recorded, yet trace ids still travel."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.telemetry import extract, inject, setup_tracing


def test_without_an_exporter_spans_are_not_recorded_but_the_trace_id_travels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    ingress = setup_tracing("ingress").get_tracer("t")
    processor = setup_tracing("processor").get_tracer("t")
    with ingress.start_as_current_span("POST /webhook/stripe") as webhook:
        assert not webhook.is_recording()
        trace_id = webhook.get_span_context().trace_id
        assert trace_id != 0
        headers = inject({})
    assert f"{trace_id:032x}" in headers["traceparent"]
    with processor.start_as_current_span("process", context=extract(headers)) as process:
        assert not process.is_recording()
        assert process.get_span_context().trace_id == trace_id


def test_with_an_exporter_every_span_is_recorded() -> None:
    exporter = InMemorySpanExporter()
    provider = setup_tracing("ingress", exporter=exporter)
    with provider.get_tracer("t").start_as_current_span("POST /webhook/stripe") as span:
        assert span.is_recording()
    provider.force_flush()
    assert [s.name for s in exporter.get_finished_spans()] == ["POST /webhook/stripe"]
