"""Kubernetes manifests: every rendered resource validates offline against the API schemas.

The kustomizations are rendered by :mod:`tests.deploy.kustomize`; built-in kinds are checked by
``kubernetes-validate`` (bundled JSON schemas, strict: unknown fields fail). Custom resources
have no bundled schema and are listed in :data:`CUSTOM_RESOURCES`, each with its own checks here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from dicom_node.settings import ConfigError, NodeSettings
from observability.auth import read_tokens
from observability.settings import ObservabilitySettings
from tests.deploy.kustomize import (
    apply_json6902,
    load_documents,
    referenced_files,
    render,
)
from worker.messages import REPORT_QUEUE
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())
KUSTOMIZATIONS = [BASE, *OVERLAYS, K8S / "components" / "keda"]
# Oldest and newest Kubernetes versions the manifests must be valid for.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Kinds that are CRDs (no bundled schema): validated by the dedicated tests below.
CUSTOM_RESOURCES = {("keda.sh/v1alpha1", "ScaledObject")}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


def _kind_name(resource: dict[str, Any]) -> str:
    return f"{resource['kind']}/{resource['metadata']['name']}"


def _by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def _containers(resources: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for r in resources:
        if r["kind"] in WORKLOAD_KINDS:
            for c in r["spec"]["template"]["spec"]["containers"]:
                yield f"{_kind_name(r)}:{c['name']}", c


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(BASE)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_resource_validates_against_the_kubernetes_schema(directory: Path) -> None:
    resources = render(directory)
    assert resources
    checked = 0
    for resource in resources:
        if (resource["apiVersion"], resource["kind"]) in CUSTOM_RESOURCES:
            # Allow-listed only while no bundled schema exists, so nothing built-in hides here.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(resource, KUBERNETES_VERSIONS[-1], strict=True)
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(resource, version, strict=True)
        checked += 1
    assert checked >= 1


def test_the_validator_rejects_an_invalid_manifest(base: list[dict[str, Any]]) -> None:
    worker = _by_kind(base, "Deployment")["d2r-worker"]
    broken = apply_json6902(
        worker, [{"op": "add", "path": "/spec/template/spec/terminationGracePeriod", "value": 1}]
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_every_manifest_file_is_part_of_a_kustomization() -> None:
    used: set[Path] = set()
    for directory in KUSTOMIZATIONS:
        used |= referenced_files(directory)
    on_disk = {p.resolve() for p in K8S.rglob("*.y*ml")}
    assert on_disk - used == set()
    for path in on_disk:
        assert load_documents(path), f"{path} holds no YAML document"


def test_references_between_resources_resolve(base: list[dict[str, Any]]) -> None:
    names = {(r["kind"], r["metadata"]["name"]) for r in base}
    for label, container in _containers(base):
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            assert (kind, ref["name"]) in names, f"{label} needs {kind} {ref['name']}"
        ports = {p["name"] for p in container.get("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container.get(probe, {})
            port = (spec.get("httpGet") or spec.get("tcpSocket") or {}).get("port")
            assert port is None or port in ports, f"{label} {probe} port {port}"
    for r in base:
        if r["kind"] in WORKLOAD_KINDS:
            for volume in r["spec"]["template"]["spec"].get("volumes", []):
                claim = volume.get("persistentVolumeClaim")
                if claim:
                    assert ("PersistentVolumeClaim", claim["claimName"]) in names


def test_services_and_policies_select_existing_pods(base: list[dict[str, Any]]) -> None:
    pod_labels = [
        r["spec"]["template"]["metadata"]["labels"] for r in base if r["kind"] in WORKLOAD_KINDS
    ]

    def selects(selector: dict[str, str]) -> bool:
        return any(selector.items() <= labels.items() for labels in pod_labels)

    for service in _by_kind(base, "Service").values():
        assert selects(service["spec"]["selector"]), _kind_name(service)
    for kind in ("NetworkPolicy", "PodDisruptionBudget"):
        for r in _by_kind(base, kind).values():
            selector = r["spec"].get("podSelector", r["spec"].get("selector"))
            labels = selector.get("matchLabels", {})
            assert not labels or selects(labels), _kind_name(r)
    statefulset = _by_kind(base, "StatefulSet")["d2r-node"]
    assert _by_kind(base, "Service")[statefulset["spec"]["serviceName"]]["spec"]["clusterIP"] == (
        "None"
    )


def test_every_container_runs_non_root_on_a_read_only_root(base: list[dict[str, Any]]) -> None:
    for r in base:
        if r["kind"] in WORKLOAD_KINDS:
            pod = r["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, _kind_name(r)
            assert pod["securityContext"]["runAsUser"] != 0
            assert pod["automountServiceAccountToken"] is False
    for label, c in _containers(base):
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True, label
        assert ctx["allowPrivilegeEscalation"] is False, label
        assert ctx["capabilities"]["drop"] == ["ALL"], label


def test_worker_gets_a_gpu_probes_and_a_grace_period_longer_than_a_study(
    base: list[dict[str, Any]],
) -> None:
    config = _by_kind(base, "ConfigMap")["d2r-config"]["data"]
    worker = _by_kind(base, "Deployment")["d2r-worker"]["spec"]["template"]["spec"]
    container = worker["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["terminationGracePeriodSeconds"] > float(config["D2R_TASK_TIME_LIMIT"])
    assert str(container["ports"][0]["containerPort"]) == config["D2R_HTTP_PORT"]


def test_dicom_service_and_policy_use_the_configured_port(base: list[dict[str, Any]]) -> None:
    port = int(_by_kind(base, "ConfigMap")["d2r-config"]["data"]["D2R_PORT"])
    service = _by_kind(base, "Service")["d2r-dicom"]
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    policy = _by_kind(base, "NetworkPolicy")["d2r-node"]
    dicom_rules = [
        rule
        for rule in policy["spec"]["ingress"]
        if {"port": port, "protocol": "TCP"} in rule["ports"]
    ]
    assert len(dicom_rules) == 1
    assert all("ipBlock" in peer for peer in dicom_rules[0]["from"])


def test_configmap_and_secret_build_valid_settings(base: list[dict[str, Any]]) -> None:
    env = dict(_by_kind(base, "ConfigMap")["d2r-config"]["data"])
    env.update(_by_kind(base, "Secret")["d2r-database"]["stringData"])
    # the shipped password is a placeholder, refused until it is replaced
    with pytest.raises(ConfigError, match="^D2R_DATABASE_URL: .* CHANGE-ME placeholder"):
        NodeSettings.from_env(env)
    env["D2R_DATABASE_URL"] = env["D2R_DATABASE_URL"].replace("CHANGE-ME", "s3cret-pw")
    node = NodeSettings.from_env(env)
    worker = WorkerSettings.from_env(env)
    assert node.database_url.startswith("postgresql+psycopg://")
    assert worker.broker_url.startswith("redis://d2r-redis:")
    assert worker.node.spool_dir == Path("/var/lib/d2r/spool")


def test_http_credentials_are_mounted_where_the_settings_point(
    base: list[dict[str, Any]], tmp_path: Path
) -> None:
    env = dict(_by_kind(base, "ConfigMap")["d2r-config"]["data"])
    secret = _by_kind(base, "Secret")["d2r-http-credentials"]["stringData"]
    folder = Path(env["D2R_HTTP_TOKENS_FILE"]).parent
    assert Path(env["D2R_HTTP_USERS_FILE"]).parent == folder
    for label, container in _containers(base):
        if label.endswith((":node", ":worker")):
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts[str(folder)]["readOnly"] is True, label
    for workload in (r for r in base if r["kind"] in WORKLOAD_KINDS):
        volumes = workload["spec"]["template"]["spec"]["volumes"]
        for volume in volumes:
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in {
                    (r["kind"], r["metadata"]["name"]) for r in base
                }
    # The Secret's files, where the pods see them, build settings that require credentials
    # once the placeholder token is replaced (refused, naming the setting and the line, before).
    for key in ("tokens", "users"):
        (tmp_path / key).write_text(secret[key])
    env["D2R_HTTP_TOKENS_FILE"] = str(tmp_path / "tokens")
    env["D2R_HTTP_USERS_FILE"] = str(tmp_path / "users")
    with pytest.raises(ConfigError, match="^D2R_HTTP_TOKENS_FILE: .* line 1 still holds"):
        ObservabilitySettings.from_env(env)
    tokens = secret["tokens"].replace("CHANGE-ME-to-the-output-of-openssl-rand-hex-32", "a" * 64)
    assert tokens != secret["tokens"]
    (tmp_path / "tokens").write_text(tokens)
    obs = ObservabilitySettings.from_env(env)
    assert obs.http_auth_required
    assert [p.roles for p in read_tokens(tmp_path / "tokens").values()] == [{"metrics"}]


def test_keda_scaled_object_targets_the_worker_and_the_report_queue() -> None:
    resources = render(K8S / "overlays" / "autoscaling")
    [scaled] = [r for r in resources if r["kind"] == "ScaledObject"]
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) in {
        (r["kind"], r["metadata"]["name"]) for r in resources
    }
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == REPORT_QUEUE
    host = trigger["metadata"]["address"].split(":")[0]
    service, namespace = host.split(".")[:2]
    assert ("Service", service) in {(r["kind"], r["metadata"]["name"]) for r in resources}
    assert namespace == scaled["metadata"]["namespace"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_loadbalancer_overlay_keeps_the_client_address() -> None:
    service = _by_kind(render(K8S / "overlays" / "loadbalancer"), "Service")["d2r-dicom"]
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert service["spec"]["loadBalancerSourceRanges"]
