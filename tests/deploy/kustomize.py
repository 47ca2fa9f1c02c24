"""A small Kustomize renderer for the tests: enough of kustomize for ``deploy/k8s``.

Supports ``resources`` (files and directories with a ``kustomization.yaml``), ``components``,
``namespace`` and ``patches`` given as JSON 6902 operation lists (inline ``patch`` or ``path``)
with a ``target`` (kind, name, optional version/group). Anything else in a kustomization raises
:class:`UnsupportedKustomization`, so a manifest never passes because a field was ignored.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "components", "namespace", "patches"}
CLUSTER_SCOPED_KINDS = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole"}


class UnsupportedKustomization(ValueError):
    """The kustomization uses a feature this renderer does not implement."""


def kustomization_file(directory: Path) -> Path:
    """The kustomization file of ``directory``; ``FileNotFoundError`` if there is none."""
    for name in KUSTOMIZATION_NAMES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no kustomization file in {directory}")


def load_documents(path: Path) -> list[Resource]:
    """All non-empty YAML documents of ``path``."""
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def _decode_pointer(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise ValueError(f"JSON pointer must start with '/': {pointer!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]


def apply_json6902(document: Resource, operations: Iterable[Mapping[str, Any]]) -> Resource:
    """Return a copy of ``document`` with the ``add``/``replace``/``remove`` operations applied."""
    result = copy.deepcopy(document)
    for op in operations:
        *parents, last = _decode_pointer(op["path"])
        node: Any = result
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            if kind == "add":
                index = len(node) if last == "-" else int(last)
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[int(last)] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[int(last)]
            else:
                raise UnsupportedKustomization(f"JSON patch op {kind!r}")
        else:
            if kind in ("replace", "remove") and last not in node:
                raise KeyError(f"{op['path']}: no such member to {kind}")
            if kind in ("add", "replace"):
                node[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[last]
            else:
                raise UnsupportedKustomization(f"JSON patch op {kind!r}")
    return result


def _matches(resource: Resource, target: Mapping[str, str]) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    checks = {
        "kind": resource["kind"],
        "name": resource["metadata"]["name"],
        "version": version,
        "group": group,
    }
    unknown = set(target) - set(checks)
    if unknown:
        raise UnsupportedKustomization(f"patch target fields {sorted(unknown)}")
    return all(checks[key] == value for key, value in target.items())


def render(directory: Path) -> list[Resource]:
    """Render the kustomization in ``directory`` into a list of resources."""
    spec_path = kustomization_file(directory)
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {}
    unsupported = set(spec) - SUPPORTED_FIELDS
    if unsupported:
        raise UnsupportedKustomization(f"{spec_path}: fields {sorted(unsupported)}")
    resources: list[Resource] = []
    for entry in [*spec.get("resources", []), *spec.get("components", [])]:
        path = (directory / entry).resolve()
        if path.is_dir():
            resources.extend(render(path))
        elif path.is_file():
            resources.extend(load_documents(path))
        else:
            raise FileNotFoundError(f"{spec_path}: resource {entry!r} does not exist")
    for patch in spec.get("patches", []):
        if "patch" in patch:
            operations = yaml.safe_load(patch["patch"])
        else:
            operations = yaml.safe_load((directory / patch["path"]).read_text(encoding="utf-8"))
        if not isinstance(operations, list):
            raise UnsupportedKustomization(f"{spec_path}: only JSON 6902 patches are supported")
        targets = [i for i, r in enumerate(resources) if _matches(r, patch["target"])]
        if len(targets) != 1:
            raise ValueError(f"{spec_path}: patch target {patch['target']} matched {len(targets)}")
        resources[targets[0]] = apply_json6902(resources[targets[0]], operations)
    namespace = spec.get("namespace")
    if namespace:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED_KINDS:
                resource["metadata"]["namespace"] = namespace
    return resources


def referenced_files(directory: Path) -> set[Path]:
    """Every file a kustomization tree names (kustomization files included)."""
    spec_path = kustomization_file(directory)
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {}
    files = {spec_path.resolve()}
    for entry in [*spec.get("resources", []), *spec.get("components", [])]:
        path = (directory / entry).resolve()
        files |= referenced_files(path) if path.is_dir() else {path}
    files |= {(directory / p["path"]).resolve() for p in spec.get("patches", []) if "path" in p}
    return files
