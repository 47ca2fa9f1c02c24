"""Kubernetes manifests: every rendered resource validates offline against the API schemas.

The kustomizations are rendered by :mod:`tests.deploy.kustomize`; built-in kinds are checked by
``kubernetes-validate`` (bundled JSON schemas, strict: unknown fields fail). Custom resources
have no bundled schema and are listed in :data:`CUSTOM_RESOURCES`, each with its own checks here.
The high-availability layout (two node replicas on different hosts sharing one spool claim and the
PostgreSQL database, Redis Sentinel for the broker) is checked property by property, and the Redis
pods' start script runs here against stand-ins for ``redis-server`` and ``redis-cli``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from d2r_core.errors import ConfigError
from d2r_http.auth import read_tokens
from dicom_node.settings import NodeSettings
from observability.settings import ObservabilitySettings
from tests.deploy.kustomize import (
    apply_json6902,
    load_documents,
    referenced_files,
    render,
)
from tests.deploy.readme import documented_settings
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
REDIS_PORT = 6379
SENTINEL_PORT = 26379
HOSTNAME_TOPOLOGY = "kubernetes.io/hostname"
# Python packages whose code reads D2R_* settings.
PRODUCT_PACKAGES = (
    "cli",
    "dicom_node",
    "worker",
    "observability",
    "delivery",
    "report",
    "model",
    "feedback",
)


def _kind_name(resource: dict[str, Any]) -> str:
    return f"{resource['kind']}/{resource['metadata']['name']}"


def _by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def _pod_names(statefulset: dict[str, Any]) -> list[str]:
    """The pods a StatefulSet runs: ``<name>-0`` ... ``<name>-<replicas - 1>``."""
    name = statefulset["metadata"]["name"]
    return [f"{name}-{i}" for i in range(statefulset["spec"]["replicas"])]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (``matchLabels``, ``matchExpressions``) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _budgets_for(resources: list[dict[str, Any]], workload: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        pdb
        for pdb in _by_kind(resources, "PodDisruptionBudget").values()
        if _selects(pdb["spec"]["selector"], _pod_labels(workload))
    ]


def _admits(
    resources: list[dict[str, Any]],
    direction: str,
    pod: dict[str, str],
    peer: dict[str, str],
    port: int,
) -> bool:
    """Whether a NetworkPolicy of the namespace lets ``peer`` pods reach (``Ingress``) or be
    reached by (``Egress``) ``pod`` on TCP ``port``: a rule naming the peer by pod labels."""
    for policy in _by_kind(resources, "NetworkPolicy").values():
        spec = policy["spec"]
        if direction not in spec["policyTypes"] or not _selects(spec["podSelector"], pod):
            continue
        for rule in spec.get(direction.lower(), []):
            peers = rule.get("from" if direction == "Ingress" else "to", [])
            ports = rule.get("ports")
            port_ok = ports is None or {"port": port, "protocol": "TCP"} in ports
            peer_ok = any(
                "podSelector" in p
                and "namespaceSelector" not in p
                and _selects(p["podSelector"], peer)
                for p in peers
            )
            if port_ok and peer_ok:
                return True
    return False


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
    for statefulset in _by_kind(base, "StatefulSet").values():
        governing = _by_kind(base, "Service")[statefulset["spec"]["serviceName"]]
        assert governing["spec"]["clusterIP"] == "None", _kind_name(statefulset)


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
    # The database URL comes from the Secret alone (envFrom: a ConfigMap value would be overridden
    # silently), and the node's name from its pod, never a value shared by all replicas.
    assert {"D2R_DATABASE_URL", "D2R_NODE_NAME"} & set(env) == set()
    env.update(_by_kind(base, "Secret")["d2r-database"]["stringData"])
    # the shipped password is a placeholder, refused until it is replaced
    with pytest.raises(ConfigError, match="^D2R_DATABASE_URL: .* CHANGE-ME placeholder"):
        NodeSettings.from_env(env)
    env["D2R_DATABASE_URL"] = env["D2R_DATABASE_URL"].replace("CHANGE-ME", "s3cret-pw")
    node = NodeSettings.from_env(env)
    worker = WorkerSettings.from_env(env)
    assert node.database_url.startswith("postgresql+psycopg://")
    assert worker.broker_url.startswith("sentinel://d2r-redis-0.d2r-redis:26379;")
    assert worker.broker_sentinel_master == env["D2R_BROKER_SENTINEL_MASTER"]
    assert worker.node.spool_dir == Path("/var/lib/d2r/spool")
    assert (node.node_heartbeat_seconds, node.node_expire_seconds) == (5.0, 30.0)
    assert (node.db_retry_seconds, node.db_ingest_wait_seconds) == (30.0, 5.0)


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
    assert trigger["type"] == "redis-sentinel"
    assert trigger["metadata"]["listName"] == REPORT_QUEUE
    config = _by_kind(resources, "ConfigMap")["d2r-config"]["data"]
    assert trigger["metadata"]["sentinelMaster"] == config["D2R_BROKER_SENTINEL_MASTER"]
    # KEDA runs in its own namespace: every Sentinel by its full name, pod.service.namespace.svc
    addresses = [a.strip() for a in trigger["metadata"]["addresses"].split(",")]
    redis = _by_kind(resources, "StatefulSet")["d2r-redis"]
    namespace = scaled["metadata"]["namespace"]
    assert [a.partition(".svc.")[0] for a in addresses] == [
        f"{pod}.{redis['spec']['serviceName']}.{namespace}" for pod in _pod_names(redis)
    ]
    assert {a.rpartition(":")[2] for a in addresses} == {str(SENTINEL_PORT)}
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_loadbalancer_overlay_keeps_the_client_address() -> None:
    service = _by_kind(render(K8S / "overlays" / "loadbalancer"), "Service")["d2r-dicom"]
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert service["spec"]["loadBalancerSourceRanges"]


def test_loadbalancer_overlay_spreads_associations_without_affinity() -> None:
    for directory in (BASE, *OVERLAYS):
        resources = render(directory)
        service = _by_kind(resources, "Service")["d2r-dicom"]
        # per-connection balancing: no client sticks to a replica that may be gone
        assert service["spec"].get("sessionAffinity", "None") == "None", directory.name
        node = _by_kind(resources, "StatefulSet")["d2r-node"]
        assert _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(node))


def test_the_node_runs_replicas_on_different_hosts(base: list[dict[str, Any]]) -> None:
    node = _by_kind(base, "StatefulSet")["d2r-node"]
    assert node["spec"]["replicas"] >= 2
    pod = node["spec"]["template"]["spec"]
    labels = _pod_labels(node)
    required = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert [
        term
        for term in required
        if term["topologyKey"] == HOSTNAME_TOPOLOGY and _selects(term["labelSelector"], labels)
    ]
    spread = pod["topologySpreadConstraints"]
    assert spread
    for constraint in spread:
        assert constraint["maxSkew"] == 1
        assert _selects(constraint["labelSelector"], labels)
    # Replicas start and are replaced independently of each other.
    assert node["spec"]["podManagementPolicy"] == "Parallel"


def test_a_disruption_budget_keeps_a_node_up_and_lets_a_drain_proceed(
    base: list[dict[str, Any]],
) -> None:
    node = _by_kind(base, "StatefulSet")["d2r-node"]
    replicas = node["spec"]["replicas"]
    [budget] = _budgets_for(base, node)
    spec = budget["spec"]
    if "minAvailable" in spec:
        assert 1 <= spec["minAvailable"] < replicas
    else:
        assert spec["maxUnavailable"] == 1 and replicas >= 2


def test_one_shared_spool_claim_is_mounted_by_every_node_replica_and_worker(
    base: list[dict[str, Any]],
) -> None:
    spool = Path(_by_kind(base, "ConfigMap")["d2r-config"]["data"]["D2R_SPOOL_DIR"])
    node = _by_kind(base, "StatefulSet")["d2r-node"]
    # volumeClaimTemplates would give each replica a spool of its own
    assert "volumeClaimTemplates" not in node["spec"]
    claims: set[str] = set()
    for workload in (node, _by_kind(base, "Deployment")["d2r-worker"]):
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = [m for m in container["volumeMounts"] if spool.is_relative_to(m["mountPath"])]
            mount = max(mounts, key=lambda m: len(m["mountPath"]))
            assert "subPath" not in mount and not mount.get("readOnly"), _kind_name(workload)
            claims.add(volumes[mount["name"]]["persistentVolumeClaim"]["claimName"])
    [claim] = claims
    spec = _by_kind(base, "PersistentVolumeClaim")[claim]["spec"]
    assert spec["accessModes"] == ["ReadWriteMany"]


def test_each_node_replica_is_named_after_its_pod(base: list[dict[str, Any]]) -> None:
    # A StatefulSet: stable pod names, so a restarted pod is the same node again.
    node = _by_kind(base, "StatefulSet")["d2r-node"]
    [container] = node["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["D2R_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    for pod in _pod_names(node):
        assert NodeSettings.from_env({"D2R_NODE_NAME": pod}).node_name == pod


def test_the_database_must_be_postgresql(base: list[dict[str, Any]]) -> None:
    url = _by_kind(base, "Secret")["d2r-database"]["stringData"]["D2R_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://")
    for workload in (r for r in base if r["kind"] in WORKLOAD_KINDS):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert "D2R_DATABASE_URL" not in names, _kind_name(workload)


def test_the_broker_is_redis_sentinel_with_three_members(base: list[dict[str, Any]]) -> None:
    config = _by_kind(base, "ConfigMap")["d2r-config"]["data"]
    redis = _by_kind(base, "StatefulSet")["d2r-redis"]
    assert redis["spec"]["replicas"] == 3
    assert "d2r-redis" not in _by_kind(base, "Deployment")
    service_name = redis["spec"]["serviceName"]
    service = _by_kind(base, "Service")[service_name]["spec"]
    # Headless, and resolvable before a pod is ready: the Sentinels find each other while starting.
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True
    assert {p["port"] for p in service["ports"]} == {REDIS_PORT, SENTINEL_PORT}
    # The broker URL names every Sentinel by its pod's DNS name, and the master name.
    hosts = []
    for entry in config["D2R_BROKER_URL"].split(";"):
        parts = urlsplit(entry)
        assert (parts.scheme, parts.port) == ("sentinel", SENTINEL_PORT)
        hosts.append(parts.hostname)
    assert hosts == [f"{pod}.{service_name}" for pod in _pod_names(redis)]
    master = config["D2R_BROKER_SENTINEL_MASTER"]
    assert master
    # Every Redis pod runs a Redis server and a Sentinel, which monitor that same master name.
    pod = redis["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"redis", "sentinel"}
    assert {p["containerPort"] for p in containers["redis"]["ports"]} == {REDIS_PORT}
    assert {p["containerPort"] for p in containers["sentinel"]["ports"]} == {SENTINEL_PORT}
    for container in containers.values():
        env = {e["name"]: e for e in container["env"]}
        assert env["MASTER_NAME"]["valueFrom"]["configMapKeyRef"] == {
            "name": "d2r-config",
            "key": "D2R_BROKER_SENTINEL_MASTER",
        }
        assert env["REDIS_REPLICAS"]["value"] == str(redis["spec"]["replicas"])
        assert env["REDIS_SERVICE"]["value"] == service_name
        assert env["POD_NAMESPACE"]["valueFrom"] == {
            "fieldRef": {"fieldPath": "metadata.namespace"}
        }
    scripts = {v["name"]: v for v in pod["volumes"]}["scripts"]["configMap"]["name"]
    assert "start.sh" in _by_kind(base, "ConfigMap")[scripts]["data"]
    # A disruption leaves the Sentinel majority (2 of 3) that a failover needs.
    [budget] = _budgets_for(base, redis)
    assert redis["spec"]["replicas"] - budget["spec"]["maxUnavailable"] >= 2


def test_network_policies_admit_the_sentinel_layout(base: list[dict[str, Any]]) -> None:
    labels = {
        name: _pod_labels(workload)
        for name, workload in {
            **_by_kind(base, "StatefulSet"),
            **_by_kind(base, "Deployment"),
        }.items()
    }
    redis = labels["d2r-redis"]
    for port in (REDIS_PORT, SENTINEL_PORT):
        for client in ("d2r-node", "d2r-worker"):
            assert _admits(base, "Egress", labels[client], redis, port), (client, port)
            assert _admits(base, "Ingress", redis, labels[client], port), (client, port)
        # replication and the Sentinels watching Redis and each other
        assert _admits(base, "Egress", redis, redis, port)
        assert _admits(base, "Ingress", redis, redis, port)
    stranger = {**redis, "app.kubernetes.io/component": "something-else"}
    assert not _admits(base, "Ingress", redis, stranger, REDIS_PORT)
    assert not _admits(base, "Ingress", labels["d2r-node"], redis, REDIS_PORT)


def test_every_deployed_setting_is_documented_and_read_by_the_product(
    base: list[dict[str, Any]],
) -> None:
    documented = documented_settings()
    config = _by_kind(base, "ConfigMap")["d2r-config"]["data"]
    env_names = {
        e["name"]
        for _, container in _containers(base)
        for e in container.get("env", [])
        if e["name"].startswith("D2R_")
    }
    assert set(config) | env_names <= documented
    read: set[str] = set()
    for package in PRODUCT_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            read |= {name for name in documented if f'"{name}"' in text}
    assert documented - read == set()


# --- the Redis pods' start script, run against stand-ins for redis-server and redis-cli ---

FAKE_REDIS_CLI = """#!/bin/sh
# Answers `-h HOST -p 26379 sentinel get-master-addr-by-name NAME` from $ANSWERS/HOST: its first
# line (removed once a later one remains); no file: the Sentinel is not reachable. The answer is
# consumed before it is printed: the script reads one line and closes the pipe, which may end
# this process before anything after the output runs.
while [ $# -gt 0 ]; do
  if [ "$1" = -h ]; then host=$2; fi
  shift
done
file="$ANSWERS/$host"
[ -f "$file" ] || { echo "Could not connect to Redis at $host:26379" >&2; exit 1; }
answer=$(head -n 1 "$file")
if [ "$(wc -l < "$file")" -gt 1 ]; then sed -i 1d "$file"; fi
printf '%s\\n6379\\n' "$answer"
"""
FAKE_REDIS_SERVER = """#!/bin/sh
echo "redis-server $*"
if [ "$2" = --sentinel ]; then cat "$1"; fi
"""
DOMAIN = "d2r-redis.d2r.svc.cluster.local"


def _redis_start(tmp_path: Path, pod: str, role: str, answers: dict[str, list[str]]) -> str:
    """Run the start script of ``pod`` for ``role``, with the Sentinels answering ``answers``
    (pod name -> the masters it names, one per query); returns its output."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = render(BASE)
    script = _by_kind(base, "ConfigMap")["d2r-redis-scripts"]["data"]["start.sh"]
    conf = tmp_path / "sentinel.conf"
    assert "/sentinel/sentinel.conf" in script
    (tmp_path / "start.sh").write_text(script.replace("/sentinel/sentinel.conf", str(conf)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (
        ("redis-cli", FAKE_REDIS_CLI),
        ("redis-server", FAKE_REDIS_SERVER),
        ("hostname", f"#!/bin/sh\necho {pod}\n"),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    answer_dir = tmp_path / "answers"
    answer_dir.mkdir(exist_ok=True)
    for peer, masters in answers.items():
        lines = "".join(f"{m}.{DOMAIN}\n" for m in masters)
        (answer_dir / f"{peer}.{DOMAIN}").write_text(lines)
    container = _by_kind(base, "StatefulSet")["d2r-redis"]["spec"]["template"]["spec"]
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "ANSWERS": str(answer_dir)}
    for e in container["containers"][0]["env"]:
        env[e["name"]] = e.get("value", "")
    # a loaded test machine may take longer than the pods' 2 s to run the stand-in redis-cli
    env.update(POD_NAMESPACE="d2r", MASTER_NAME="d2r", SENTINEL_QUERY_SECONDS="30")
    result = subprocess.run(
        ["sh", str(tmp_path / "start.sh"), role],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _server_args(output: str) -> list[str]:
    [line] = [line for line in output.splitlines() if line.startswith("redis-server ")]
    return line.split()[1:]


def test_redis_start_script_is_valid_shell(base: list[dict[str, Any]], tmp_path: Path) -> None:
    script = tmp_path / "start.sh"
    script.write_text(_by_kind(base, "ConfigMap")["d2r-redis-scripts"]["data"]["start.sh"])
    for shell in ("sh", "dash", "busybox"):
        if shutil.which(shell):
            args = [shell, "sh", "-n"] if shell == "busybox" else [shell, "-n"]
            result = subprocess.run([*args, str(script)], capture_output=True, text=True)
            assert result.returncode == 0, (shell, result.stderr)


def test_redis_first_start_makes_pod_0_the_master(tmp_path: Path) -> None:
    args = _server_args(_redis_start(tmp_path, "d2r-redis-0", "redis", {}))
    assert "--replicaof" not in args
    assert args[args.index("--replica-announce-ip") + 1] == f"d2r-redis-0.{DOMAIN}"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    args = _server_args(_redis_start(tmp_path / "1", "d2r-redis-1", "redis", {}))
    assert args[args.index("--replicaof") + 1 :][:2] == [f"d2r-redis-0.{DOMAIN}", "6379"]


def test_redis_restart_follows_the_master_the_sentinels_name(tmp_path: Path) -> None:
    answers = {"d2r-redis-1": ["d2r-redis-2"]}
    args = _server_args(_redis_start(tmp_path, "d2r-redis-0", "redis", answers))
    assert args[args.index("--replicaof") + 1] == f"d2r-redis-2.{DOMAIN}"


def test_a_restarted_master_waits_for_a_failover_instead_of_coming_back_empty(
    tmp_path: Path,
) -> None:
    # The Sentinels still name the restarted pod; on the next query they name the promoted one.
    answers = {"d2r-redis-1": ["d2r-redis-0", "d2r-redis-2"]}
    output = _redis_start(tmp_path, "d2r-redis-0", "redis", answers)
    assert "waiting for them to promote a replica" in output
    args = _server_args(output)
    assert args[args.index("--replicaof") + 1] == f"d2r-redis-2.{DOMAIN}"


def test_sentinel_monitors_the_current_master_by_name(tmp_path: Path) -> None:
    output = _redis_start(tmp_path, "d2r-redis-2", "sentinel", {"d2r-redis-0": ["d2r-redis-1"]})
    assert _server_args(output)[1] == "--sentinel"
    lines = output.splitlines()
    monitor = f"sentinel monitor d2r d2r-redis-1.{DOMAIN} {REDIS_PORT} 2"
    assert monitor in lines
    assert f"sentinel announce-ip d2r-redis-2.{DOMAIN}" in lines
    assert f"port {SENTINEL_PORT}" in lines
    # host names must be resolved before the monitor line names one
    assert lines.index("sentinel resolve-hostnames yes") < lines.index(monitor)
    assert "sentinel announce-hostnames yes" in lines
    first = _redis_start(tmp_path / "cold", "d2r-redis-1", "sentinel", {})
    assert f"sentinel monitor d2r d2r-redis-0.{DOMAIN} {REDIS_PORT} 2" in first.splitlines()
