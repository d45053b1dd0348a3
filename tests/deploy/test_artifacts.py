"""Deployment artifacts validated offline: compose against the compose-spec schema, Kubernetes manifests
with kubernetes-validate for a stated version, the CRD against its vendored schema, systemd units with
systemd-analyze, and the Dockerfile's promises (pinned, multi-stage, non-root, installs from the lock)."""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from tests.support import REPO

pytestmark = pytest.mark.timeout(60)
DEPLOY: Final = REPO / "deploy"
K8S: Final = DEPLOY / "k8s"
# The Kubernetes version the manifests are written for (README "Kubernetes"); kubernetes-validate
# is pinned in pyproject.toml and ships its schemas.
KUBERNETES_VERSION: Final = "1.33.0"
CRD_SCHEMAS: Final = {
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): K8S / "schemas" / "rabbitmqcluster-v1beta1.json"
}
BIN: Final = Path(sys.executable).parent


# --- compose ---------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    # check-jsonschema vendors the compose-spec schema (with its license) and needs no network
    command = [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = check_compose_schema(DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  x:\n    image: paybus\n    restart: sometimes\n    bogus: 1\n")
    assert check_compose_schema(broken).returncode != 0


def test_compose_wires_each_service_with_its_own_least_privilege_identity() -> None:
    services = compose()["services"]
    assert {"postgres", "rabbitmq", "migrate", "db-grants", "ingress", "processor", "localstripe"} <= set(
        services
    )
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    ingress, processor = services["ingress"]["environment"], services["processor"]["environment"]
    assert ingress["PAYBUS_DECLARE_TOPOLOGY"] == processor["PAYBUS_DECLARE_TOPOLOGY"] == "false"
    assert ingress["AMQP_URL"].startswith("amqp://paybus-ingress:")
    assert processor["AMQP_URL"].startswith("amqp://paybus-processor:")
    assert ingress["DATABASE_URL"].startswith("postgresql://paybus_ingress@")  # the NOLOGIN role
    assert processor["DATABASE_URL"].startswith("postgresql://paybus_processor:")
    assert services["migrate"]["environment"]["DATABASE_URL"].startswith("postgresql://paybus_owner:")
    assert services["migrate"]["command"] == ["migrate"]
    assert services["localstripe"]["profiles"] == ["dev"]
    assert all("profiles" not in s for n, s in services.items() if n != "localstripe")
    for name in ("ingress", "processor", "migrate"):
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"]
    # the broker loads what broker-definitions renders, with the tool the image ships
    render = " ".join(services["broker-definitions"]["command"])
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "/opt/paybus/share/rabbitmq/set_passwords.py" in render
    assert (
        "deploy/rabbitmq/set_passwords.py deploy/rabbitmq/definitions.json /opt/paybus/share/rabbitmq/"
        in dockerfile
    )
    conf = (DEPLOY / "compose" / "rabbitmq.conf").read_text()
    assert "load_definitions = /etc/rabbitmq/paybus/definitions.json" in conf
    assert "rabbitmq-definitions:/etc/rabbitmq/paybus:ro" in services["rabbitmq"]["volumes"]


# --- Kubernetes ------------------------------------------------------------------------------------


@functools.cache
def manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted([*K8S.glob("*.yaml"), *K8S.glob("examples/*.yaml")]):
        if path.name == "kustomization.yaml":
            continue
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def strict(schema: Any) -> Any:
    """The CRD schema as the API server's strict field validation applies it: unknown fields are errors."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        open_ended = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in schema and not open_ended:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def validate_custom(doc: dict[str, Any]) -> None:
    schema = strict(json.loads(CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])].read_text()))
    jsonschema.Draft7Validator(schema).validate(doc)


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def test_kubernetes_manifests_are_valid_for_the_stated_version() -> None:
    checked = 0
    for path, doc in manifests():
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            validate_custom(doc)
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
        checked += 1
    assert checked >= 20


def test_validation_rejects_broken_manifests() -> None:
    deployment = copy.deepcopy(by_kind("Deployment")["paybus-ingress"])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    cluster = copy.deepcopy(by_kind("RabbitmqCluster")["paybus-rabbitmq"])
    cluster["spec"]["replica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(cluster)
    cluster = copy.deepcopy(by_kind("RabbitmqCluster")["paybus-rabbitmq"])
    cluster["spec"]["replicas"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(cluster)


def test_kustomization_lists_every_manifest_and_renders() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: rendering with kustomize not checked")
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert all(d["metadata"].get("namespace", "paybus") == "paybus" for d in docs)
    images = {
        c["image"]
        for d in docs
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {"registry.example.com/paybus:0.1.0"}


def pod_specs() -> dict[str, dict[str, Any]]:
    specs = {}
    for name, doc in by_kind("Deployment").items():
        specs[name] = doc["spec"]["template"]["spec"]
    for name, doc in by_kind("Job").items():
        specs[name] = doc["spec"]["template"]["spec"]
    for name, doc in by_kind("CronJob").items():
        specs[name] = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def test_probes_use_the_configured_ports_and_every_container_is_limited_and_unprivileged() -> None:
    config = by_kind("ConfigMap")["paybus-config"]["data"]
    deployments = by_kind("Deployment")
    for name, port_key in (("paybus-ingress", "INGRESS_PORT"), ("paybus-processor", "METRICS_PORT")):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert len(ports) == 1 and list(ports.values()) == [int(config[port_key])]
        port_name = next(iter(ports))
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port_name}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port_name}
    for name, spec in pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), (name, container["name"])
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_scaling_objects_point_at_real_workloads() -> None:
    deployments = by_kind("Deployment")
    assert deployments["paybus-ingress"]["spec"]["replicas"] >= 2
    assert deployments["paybus-processor"]["spec"]["replicas"] >= 2
    hpa = by_kind("HorizontalPodAutoscaler")["paybus-ingress"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "paybus-ingress" and hpa["spec"]["minReplicas"] >= 2
    for pdb in by_kind("PodDisruptionBudget").values():
        selector = pdb["spec"]["selector"]["matchLabels"]
        matching = [
            d
            for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, pdb["metadata"]["name"]
    for service in by_kind("Service").values():
        selector = service["spec"]["selector"]
        assert any(
            selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in deployments.values()
        )
    cluster = by_kind("RabbitmqCluster")["paybus-rabbitmq"]
    assert cluster["spec"]["replicas"] == 3


def test_reconcile_runs_nightly_and_migrations_apply_the_committed_grants() -> None:
    cron = by_kind("CronJob")["paybus-reconcile"]
    assert re.fullmatch(r"\d+ \d+ \* \* \*", cron["spec"]["schedule"])
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["reconcile", "--since", "2d"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = by_kind("Job")["paybus-migrate"]["spec"]["template"]["spec"]
    assert job["initContainers"][0]["args"] == ["migrate"]
    grants = by_kind("ConfigMap")["paybus-db-grants"]["data"]["grants.sql"]
    assert grants == (DEPLOY / "postgres" / "grants.sql").read_text()


def test_every_referenced_config_and_secret_is_defined_or_documented() -> None:
    configmaps = set(by_kind("ConfigMap"))
    secrets = set(by_kind("Secret"))  # examples/secrets.example.yaml documents each one
    for name, spec in pod_specs().items():
        for container in spec.get("initContainers", []) + spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, name
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, name
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, name
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, name
    cluster = by_kind("RabbitmqCluster")["paybus-rabbitmq"]
    volumes = cluster["spec"]["override"]["statefulSet"]["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["secret"]["secretName"] in secrets


def test_network_policies_deny_by_default_and_select_real_pods() -> None:
    policies = by_kind("NetworkPolicy")
    assert policies["default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    labels = [spec_labels for spec_labels in _pod_labels()]
    for name, policy in policies.items():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        assert any(selector.items() <= pod.items() for pod in labels), name
    # the ingress may reach the broker and nothing else (besides DNS)
    egress = policies["paybus-ingress"]["spec"]["egress"]
    assert [rule["ports"] for rule in egress] == [[{"protocol": "TCP", "port": 5672}]]


def _pod_labels() -> list[dict[str, str]]:
    found = [d["spec"]["template"]["metadata"]["labels"] for d in by_kind("Deployment").values()]
    found += [j["spec"]["template"]["metadata"]["labels"] for j in by_kind("Job").values()]
    found += [
        c["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
        for c in by_kind("CronJob").values()
    ]
    found += [{"app.kubernetes.io/name": name} for name in by_kind("RabbitmqCluster")]  # the operator's label
    return found


# --- Dockerfile ------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    stages: list[list[str]] = []
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_pinned_non_root_and_installs_from_the_lock() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base.group(1))
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert final[0].endswith("AS runtime")
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1] not in {"0", "root"}
    assert "COPY --from=build /opt/paybus /opt/paybus" in final
    assert not any(line.startswith(("RUN pip", "RUN /opt/paybus/bin/pip")) for line in final), (
        "no installs at runtime"
    )
    assert any("pip install -c deploy/requirements.lock ." in line for line in stages[0])


def test_dockerfile_copies_only_what_the_dockerignore_sends() -> None:
    patterns = [
        p
        for p in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if p and not p.startswith("#")
    ]

    def sent(path: str) -> bool:
        included = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            glob = pattern.lstrip("!").replace("/**", "*")
            if fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(path.split("/")[0], glob):
                included = negate
        return included

    for stage in dockerfile_stages():
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), source
                    assert sent(source), f"{source} is excluded by Dockerfile.dockerignore"


# --- systemd ---------------------------------------------------------------------------------------


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    units = sorted((DEPLOY / "systemd").glob("*.service")) + sorted((DEPLOY / "systemd").glob("*.timer"))
    names = []
    for unit in units:
        # the VM install puts paybus in /opt/paybus and runs it as user paybus: map both to this machine
        text = unit.read_text().replace("/opt/paybus/bin/paybus", str(BIN / "paybus"))
        text = re.sub(r"^User=paybus$", "User=daemon", text, flags=re.MULTILINE)
        text = re.sub(r"^Group=paybus$", "Group=daemon", text, flags=re.MULTILINE)
        name = unit.name.replace("@.service", "@1.service")
        (tmp_path / name).write_text(text)
        names.append(name)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not re.search(r"Unknown|Failed|ignoring|not executable", output), output
    assert (
        "ExecStart=/opt/paybus/bin/paybus reconcile --since 2d"
        in (DEPLOY / "systemd" / "paybus-reconcile.service").read_text()
    )
