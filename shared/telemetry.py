"""Tracing (OpenTelemetry) and Prometheus metrics for both services; exporters never block a request."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:  # imported in setup_tracing: an ingress without an exporter never loads the SDK
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LAG_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


def setup_tracing(service: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """A tracer provider for ``service``; OTLP export only when OTEL_EXPORTER_OTLP_ENDPOINT is set.

    The batch processor hands spans to a background thread with a bounded queue (dropping when full),
    so a collector that is down never slows or fails the request path. With no exporter the spans
    would go nowhere, so none is recorded (the SDK's cost per span, paid per event, is saved); they
    still carry ids, so log lines keep their trace ids and a parent's trace is continued.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    resource = Resource.create({"service.name": f"paybus-{service}"})
    if exporter is None and export_configured():
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    if exporter is None:
        return TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def export_configured() -> bool:
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


class PropagatingTracer(trace.NoOpTracer):
    """Spans that record nothing yet carry ids, for a service that exports no spans.

    The trace context still flows: ``traceparent`` goes into the AMQP headers and log lines carry
    ``trace_id``, so the processor continues the trace and logs correlate across services, as with a
    recording tracer, without the SDK's per-span cost. The sampled flag is set, as the SDK's default
    sampler would, so a processor that does export keeps its spans.
    """

    def start_span(self, name: str, context: Context | None = None, *args: Any, **kwargs: Any) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        return trace.NonRecordingSpan(
            trace.SpanContext(
                trace_id=parent.trace_id if parent.is_valid else random.getrandbits(128) or 1,
                span_id=random.getrandbits(64) or 1,
                is_remote=False,
                trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
            )
        )


def shutdown_tracing(provider: TracerProvider, timeout: float = 3.0) -> None:
    """Flush what can be flushed in ``timeout`` seconds; a dead collector must not hold up shutdown."""
    worker = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    worker.start()
    worker.join(timeout)


def inject(headers: dict[str, Any]) -> dict[str, Any]:
    """Add the current trace context (``traceparent``) to AMQP headers."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, Any] | None) -> Context:
    """The trace context carried by AMQP headers (bytes or str values)."""
    carrier = {
        key: value.decode() if isinstance(value, bytes) else value
        for key, value in (headers or {}).items()
        if isinstance(value, str | bytes)
    }
    return propagate.extract(carrier)


def current_ids() -> tuple[str, str] | None:
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.webhooks = Counter(
            "paybus_webhooks", "Webhook requests by outcome", ["outcome"], registry=self.registry
        )
        self.publish_seconds = Histogram(
            "paybus_publish_seconds",
            "Time from publish to broker confirm",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        for outcome in (
            "accepted",
            "bad_signature",
            "stale",
            "rejected",
            "unavailable",
            "not_found",
            "too_large",
        ):
            self.webhooks.labels(outcome)


class ProcessorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "paybus_events_processed", "Stripe events by type and outcome", ["type", "outcome"], registry=r
        )
        self.processing_seconds = Histogram(
            "paybus_event_processing_seconds",
            "Time to apply one event (transaction included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag_seconds = Histogram(
            "paybus_event_lag_seconds",
            "Commit time minus the ingress received-at",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.retries = Counter("paybus_retries", "Messages sent to a retry queue", ["queue"], registry=r)
        self.dead_letters = Counter(
            "paybus_dead_letters", "Messages dead-lettered", ["queue", "reason"], registry=r
        )
        self.outbox_backlog = Gauge("paybus_outbox_backlog", "Outbox rows not yet relayed", registry=r)
        self.requests = Counter(
            "paybus_payment_requests", "Payment requests by kind and outcome", ["kind", "outcome"], registry=r
        )
        self.stripe_seconds = Histogram(
            "paybus_stripe_api_seconds",
            "Stripe API call latency",
            ["operation"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.stripe_errors = Counter(
            "paybus_stripe_api_errors", "Stripe API errors", ["operation", "code"], registry=r
        )
        self.queue_depth = Gauge("paybus_queue_depth", "Messages ready in a queue", ["queue"], registry=r)
        self.database_up = Gauge("paybus_database_up", "1 while the processor can reach Postgres", registry=r)
