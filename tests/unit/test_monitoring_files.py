"""The example alert rules and dashboard only use metrics the services really export."""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client import generate_latest

from shared.telemetry import IngressMetrics, ProcessorMetrics
from tests.support import REPO

METRIC = re.compile(r"\b(paybus_[a-z_]+)\b")


def _exported() -> set[str]:
    ingress, processor = IngressMetrics(), ProcessorMetrics()
    # touch every labelled family so it appears in the exposition
    processor.events.labels("t", "applied").inc()
    processor.retries.labels("q").inc()
    processor.dead_letters.labels("q", "poison").inc()
    processor.requests.labels("k", "ok").inc()
    processor.stripe_seconds.labels("op").observe(0.1)
    processor.stripe_errors.labels("op", "c").inc()
    processor.queue_depth.labels("q").set(1)
    text = generate_latest(ingress.registry).decode() + generate_latest(processor.registry).decode()
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }


def test_alert_rules_parse_and_reference_exported_metrics() -> None:
    rules = yaml.safe_load((REPO / "deploy/prometheus/alerts.yaml").read_text())
    exported = _exported()
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {
        "PaybusWebhooksUnavailable",
        "PaybusDeadLettersGrowing",
        "PaybusProcessingLag",
        "PaybusOutboxBacklog",
        "PaybusStripeApiErrors",
    } <= {a["alert"] for a in alerts}
    for alert in alerts:
        assert alert["annotations"]["summary"]
        used = set(METRIC.findall(alert["expr"]))
        assert used and used <= exported, f"{alert['alert']} uses unknown metrics {used - exported}"


def test_dashboard_panels_reference_exported_metrics() -> None:
    dashboard = json.loads((REPO / "deploy/grafana/paybus-dashboard.json").read_text())
    exported = _exported()
    assert len(dashboard["panels"]) >= 8
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = set(METRIC.findall(target["expr"]))
            assert used and used <= exported, f"{panel['title']} uses unknown metrics {used - exported}"
