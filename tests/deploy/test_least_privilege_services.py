"""The real services run under their least-privilege broker users and Postgres roles, end to end."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from shared import samples
from shared.amqp import DEFAULT_RETRY_DELAYS_MS
from tests.conftest import env_for
from tests.deploy.conftest import Broker, Cluster
from tests.support import PG_BASE, Service, signed, wait_for_sync

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]
DEFAULT_DELAYS = ",".join(str(d) for d in DEFAULT_RETRY_DELAYS_MS)


def post(port: int, envelope: dict[str, object]) -> int:
    body, headers = signed(envelope)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/webhook/stripe", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - local test ingress
        return int(response.status)


def test_ingress_and_processor_work_with_only_their_own_rights(
    broker: Broker, cluster: Cluster, tmp_path: Path
) -> None:
    common = {"PAYBUS_DECLARE_TOPOLOGY": "false", "PAYBUS_RETRY_DELAYS_MS": DEFAULT_DELAYS}
    # the ingress gets a DATABASE_URL naming its NOLOGIN role: it never connects
    ingress_env = env_for(cluster.url("ingress"), broker.url("paybus-ingress"), **common)
    processor_env = env_for(cluster.url("processor"), broker.url("paybus-processor"), **common)
    ingress = Service("ingress", ingress_env, tmp_path / "ingress.log").start()
    processor = Service("processor", processor_env, tmp_path / "processor.log").start()
    try:
        ingress.wait_ready(f"http://127.0.0.1:{ingress_env['INGRESS_PORT']}/readyz")
        processor.wait_ready(f"http://127.0.0.1:{processor_env['METRICS_PORT']}/readyz")
        intent = samples.payment_intent(status="succeeded", user_id="6f1c8a53-4a57-4a2e-9b5e-2f6c3f0f7a11")
        envelope = samples.event("payment_intent.succeeded", intent)
        assert post(int(ingress_env["INGRESS_PORT"]), envelope) == 200

        def applied() -> tuple[object, ...] | None:
            with psycopg.connect(f"{PG_BASE}/{cluster.dbname}") as conn:
                return conn.execute(
                    "SELECT e.outcome, p.status FROM stripe_events e"
                    " JOIN payments p ON p.stripe_payment_intent_id = %s WHERE e.id = %s",
                    (intent["id"], envelope["id"]),
                ).fetchone()

        assert wait_for_sync(applied, timeout=20) == ("applied", "succeeded")
    finally:
        ingress.stop()
        processor.stop()
    for service in (ingress, processor):
        assert "ACCESS_REFUSED" not in service.log()
        assert "permission denied" not in service.log()


def test_ingress_without_configure_rights_needs_declare_topology_off(broker: Broker, tmp_path: Path) -> None:
    # the default (declare at start) would need configure rights the ingress user does not have:
    # it stays not-ready and says why, instead of serving webhooks it could not publish
    env = env_for(f"{PG_BASE}/unused", broker.url("paybus-ingress"))
    ingress = Service("ingress", env, tmp_path / "ingress.log").start()
    try:
        wait_for_sync(lambda: "ChannelAccessRefused" in ingress.log(), timeout=20)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{env['INGRESS_PORT']}/readyz", timeout=5)  # noqa: S310
        assert caught.value.code == 503
    finally:
        ingress.stop()


def test_declare_topology_defaults_on_and_parses_like_every_switch() -> None:
    from shared.config import ConfigError, load_settings

    assert load_settings({}).declare_topology is True  # `make run` against a guest broker keeps working
    assert load_settings({"PAYBUS_DECLARE_TOPOLOGY": "false"}).declare_topology is False
    with pytest.raises(ConfigError, match="PAYBUS_DECLARE_TOPOLOGY must be true or false"):
        load_settings({"PAYBUS_DECLARE_TOPOLOGY": "sometimes"})


def test_processor_without_the_topology_stops_at_once_and_says_what_to_load(
    make_vhost: Callable[[], str], tmp_path: Path
) -> None:
    env = env_for(f"{PG_BASE}/unused", make_vhost(), PAYBUS_DECLARE_TOPOLOGY="false")
    processor = Service("processor", env, tmp_path / "processor.log").start()
    try:
        assert processor.proc is not None
        assert processor.proc.wait(timeout=30) == 2
    finally:
        processor.stop()
    log = processor.log()
    assert "RabbitMQ topology missing" in log and "paybus.stripe-events" in log
    assert "Traceback" not in log
