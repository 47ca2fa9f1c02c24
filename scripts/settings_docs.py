"""Write the settings documentation from the settings declared in the code.

Three files repeat the ``D2R_*`` settings; each holds a part generated here, between marker
lines, from the declarations (:func:`cli.commands.config.declared_settings`: name, default,
parser, one-line documentation, section):

- ``README.md``: the configuration table (variable, default, meaning);
- ``deploy/systemd/d2r.env.example``: every setting by section, its documentation as a comment,
  then its line, set or commented out as :data:`SYSTEMD` says (the example values of a
  single-host install and their guidance live there);
- ``deploy/k8s/base/configmap.yaml``: the ConfigMap's data, the settings :data:`KUBERNETES`
  names, with the declared default unless it gives a value.

Usage (from the repository root)::

    python -m scripts.settings_docs --write   # regenerate the three parts
    python -m scripts.settings_docs --check   # exit 1, naming the stale files, if one differs
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.commands.config import declared_settings
from d2r_core.settings_spec import Group, Setting

ROOT = Path(__file__).resolve().parent.parent
README = Path("README.md")
ENV_EXAMPLE = Path("deploy/systemd/d2r.env.example")
CONFIGMAP = Path("deploy/k8s/base/configmap.yaml")
COMMAND = "python -m scripts.settings_docs --write"
BEGIN = "BEGIN GENERATED SETTINGS"
END = "END GENERATED SETTINGS"
WIDTH = 100


@dataclass(frozen=True)
class Example:
    """How a deployment's example configuration writes one setting.

    Parameters
    ----------
    value : str or None
        The value written; None: the declared default.
    active : bool
        Written as ``NAME=value`` (else commented out, ``# NAME=value``).
    note : str
        Guidance for this deployment, a comment above the line.
    line : bool
        False: no ``NAME=value`` line at all (the setting is set elsewhere, e.g. by the units).
    alternatives : tuple of (str, str)
        ``(note, value)`` of further commented-out examples after the line.
    """

    value: str | None = None
    active: bool = False
    note: str = ""
    line: bool = True
    alternatives: tuple[tuple[str, str], ...] = ()


def _set(value: str | None = None, note: str = "") -> Example:
    return Example(value, active=True, note=note)


#: the systemd example: the settings set (or shown with a non-default example) on a single host,
#: and their guidance; any other setting is commented out with its default
SYSTEMD: dict[str, Example] = {
    "D2R_AE_TITLE": _set(),
    "D2R_HOST": _set(),
    "D2R_PORT": _set(),
    "D2R_MAX_PDU": _set(),
    "D2R_MAX_ASSOCIATIONS": _set(),
    "D2R_LISTENER_PROCESSES": _set(),
    "D2R_ACSE_TIMEOUT": _set(),
    "D2R_DIMSE_TIMEOUT": _set(),
    "D2R_NETWORK_TIMEOUT": _set(),
    "D2R_MIN_FREE_BYTES": _set(note="1073741824 bytes: 1 GiB."),
    "D2R_SPOOL_DIR": _set("/var/lib/d2r/spool"),
    "D2R_DATABASE_URL": Example(
        "sqlite:////var/lib/d2r/d2r.db",
        active=True,
        note="SQLite on one host; PostgreSQL when node and workers run on several hosts (see "
        "below).",
        alternatives=(("", "postgresql+psycopg://d2r:CHANGE-ME@db.example.org/d2r"),),
    ),
    "D2R_DB_AUTO_UPGRADE": Example(
        note="Without it, run `d2r db upgrade` after a backup (docs/operations.md)."
    ),
    "D2R_NODE_NAME": Example("d2r-a"),
    "D2R_STUDY_QUIET_SECONDS": _set(),
    "D2R_URGENT_QUIET_SECONDS": Example("3"),
    "D2R_STUDY_FORCE_SECONDS": _set(),
    "D2R_STUDY_RELEASE_GRACE_SECONDS": _set(),
    "D2R_PRIORITY_RULES": Example(
        "ED_CR1,ICU_DX=stat;10.2.0.0/16=urgent",
        note="Urgent studies first: rules by sender, ahead of the headers' priority "
        '(docs/operations.md, "Priority").',
    ),
    "D2R_RECONCILE_SECONDS": _set(),
    "D2R_MAX_ATTEMPTS": _set(),
    "D2R_CLAIM_LEASE_SECONDS": _set(),
    "D2R_CLAIM_HEARTBEAT_SECONDS": _set(),
    "D2R_BROKER_URL": Example(
        active=True,
        alternatives=(
            (
                "Redis Sentinel instead of one Redis (several nodes: no single broker to lose): "
                "every Sentinel, separated by ';', and the master name they monitor "
                "(D2R_BROKER_SENTINEL_MASTER):",
                "sentinel://10.20.0.21:26379;sentinel://10.20.0.22:26379;"
                "sentinel://10.20.0.23:26379",
            ),
        ),
    ),
    "D2R_TASK_TIME_LIMIT": _set(),
    "D2R_VISIBILITY_TIMEOUT": _set("720"),
    "D2R_MODEL": _set("/opt/d2r/models/d2r-net"),
    "D2R_WORKER_CONCURRENCY": _set(),
    "D2R_DEVICE": Example(
        note="Not set here: this file overrides the units' own settings. d2r-worker@.service "
        "sets CUDA_VISIBLE_DEVICES, D2R_DEVICE=cuda and D2R_HTTP_PORT per GPU (overrides per "
        "GPU in /etc/d2r/worker-<index>.env); d2r-serve.service sets D2R_DEVICE=cuda. On a "
        "CPU-only machine:"
    ),
    "D2R_BATCH_MAX": Example(
        "8",
        note="Unset, it follows the device: 8 on cuda, 1 on cpu (where a batch saves little); "
        "set it only to override both.",
    ),
    "D2R_BATCH_WAIT_MS": _set(),
    "D2R_MODEL_SHA256": Example("<64 hex digits printed by d2r train / d2r init-model>"),
    "D2R_ENGINE_DIR": Example("/opt/d2r/engines/d2r-net"),
    "D2R_BACKEND_CACHE_DIR": Example(
        "/var/lib/d2r/backend-cache",
        note="Unset, it is backend-cache beside the spool; on a read-only or shared spool host, "
        "name a local folder the worker may write.",
    ),
    "D2R_LESION_MIN_SCORE": Example("0.3"),
    "D2R_INPUT_GATE": _set("on"),
    "D2R_REPORT_CHOICE": _set(),
    "D2R_DESTINATIONS": _set(
        "PACS@pacs.example.org:104",
        "The PACS must accept Comprehensive SR and Basic Text SR. HTTP destinations with a "
        "token_file or basic_auth_file need https:// (plain http:// only with ?insecure=true in "
        "the address).",
    ),
    "D2R_TEXT_SR": _set(),
    "D2R_SR_TRACKING_IDENTIFIER": _set(),
    "D2R_SR_ROI_ENCODING": _set(),
    "D2R_SEND_RETRIES": _set(),
    "D2R_SEND_RETRY_DELAY": _set(),
    "D2R_HTTP_PORT": Example(
        note="Default 8080 for d2r node and d2r serve. Never set it here when workers share the "
        "host: every worker instance would get the same port."
    ),
    "D2R_HTTP_HOST": Example(
        "0.0.0.0",
        note="Loopback by default (the status page shows study details); 0.0.0.0 lets "
        "Prometheus on another host scrape it. docs/security.md has the roles.",
    ),
    "D2R_HTTP_TOKENS_FILE": Example(
        line=False,
        note="The units load /etc/d2r/http-tokens as a systemd credential and set it: do not "
        "set it here.",
    ),
    "D2R_HTTP_USERS_FILE": Example(
        line=False,
        note="The units load /etc/d2r/http-users as a systemd credential and set it: do not set "
        "it here.",
    ),
    "D2R_HTTP_TRUSTED_PROXIES": Example(
        "10.20.0.5",
        note="A reverse proxy (OIDC) that authenticates users and names them in a header.",
    ),
    "D2R_HTTP_TLS_CERT": Example(
        "/etc/d2r/tls/http.crt", note="PEM files readable by the d2r group."
    ),
    "D2R_HTTP_TLS_KEY": Example("/etc/d2r/tls/http.key"),
    "D2R_HTTP_TLS_CA": Example(
        "/etc/d2r/tls/stow-clients-ca.crt",
        note="Use a CA that signs only the STOW-RS senders' certificates. Tokens with the ingest "
        "role work too (docs/operations.md).",
    ),
    "D2R_AUDIT_LOG": Example("/var/lib/d2r/audit.jsonl"),
    "D2R_ALLOWED_CALLING_AETS": Example(
        "PACS_STORE,PACS_QR",
        note="Many PACS store from another AE title than they query with: check `d2r audit` first.",
    ),
    "D2R_ALLOWED_NETWORKS": Example("10.20.0.0/16"),
    "D2R_TLS_CERT": Example("/etc/d2r/tls/node.crt"),
    "D2R_TLS_KEY": Example("/etc/d2r/tls/node.key"),
    "D2R_TLS_CA": Example("/etc/d2r/tls/ca.crt"),
    "D2R_LOG_LEVEL": _set(),
}

#: guidance at the top of a section of the systemd example
SYSTEMD_SECTIONS: dict[Group, str] = {
    Group.NODES: (
        "Two or more hosts run d2r-node.service behind a TCP load balancer "
        "(haproxy-d2r.cfg.example), each with this file and: the same D2R_DATABASE_URL, "
        "PostgreSQL (with SQLite a second node is refused at start); the same spool: one shared "
        "file system (NFS 4.1+, CephFS, ...) mounted at D2R_SPOOL_DIR on every host, "
        "hard-mounted (never `soft`), with the d2r user's UID and GID the same on every host "
        "(pin them in /etc/sysusers.d/d2r.conf). Only the spool is shared: /var/lib/d2r itself "
        "(audit log, metrics) stays local to each host; the same broker (one Redis all hosts "
        "reach, or Redis Sentinel, D2R_BROKER_URL below); its own D2R_NODE_NAME. Keep the "
        "hosts' clocks synchronised (chrony, systemd-timesyncd)."
    ),
    Group.HTTP: (
        "Off loopback everything but /healthz and /readyz needs a credential: bearer tokens and "
        "basic-auth users come from /etc/d2r/http-tokens and /etc/d2r/http-users, which the "
        "units load as systemd credentials."
    ),
    Group.ACCESS: (
        "Calling AE titles and networks allowed to associate are each optional; empty = anyone, "
        "which d2r warns of at start while D2R_HOST is not loopback."
    ),
}

#: the Kubernetes ConfigMap's data: these settings, with the declared default where no value
#: is given (the database URL is the Secret's; D2R_NODE_NAME is set per pod)
KUBERNETES: dict[str, Example] = {
    "D2R_AE_TITLE": Example(),
    "D2R_PORT": Example(),
    "D2R_MAX_PDU": Example(),
    "D2R_MAX_ASSOCIATIONS": Example(),
    "D2R_LISTENER_PROCESSES": Example(
        note="Processes receiving on the DICOM port (per node pod); raise it with the node "
        "container's CPU request when the PACS sends over several associations at once. Not "
        "above 1 while several node replicas mount the volume: they would share the metrics "
        "folder beside the spool."
    ),
    "D2R_MIN_FREE_BYTES": Example(),
    "D2R_SPOOL_DIR": Example("/var/lib/d2r/spool"),
    "D2R_MAX_PIXEL_BYTES": Example(
        note="Largest pixel data of one stored image the status page previews and the worker "
        "reads (checked from the header before the pixels are read or inflated; at most "
        "128 MiB)."
    ),
    "D2R_NODE_HEARTBEAT_SECONDS": Example(
        note="Active-active nodes: each records that it is alive every heartbeat; a node silent "
        "for the expiry is taken as dead and a surviving node expires the associations it held "
        "open."
    ),
    "D2R_NODE_EXPIRE_SECONDS": Example(),
    "D2R_DB_RETRY_SECONDS": Example(
        note="Through a database outage: how long the assembler and the workers retry their "
        "database work, and how long an incoming instance waits before it is refused (C-STORE "
        "0x0110, STOW-RS 503)."
    ),
    "D2R_DB_INGEST_WAIT_SECONDS": Example(),
    "D2R_STUDY_QUIET_SECONDS": Example(),
    "D2R_STUDY_FORCE_SECONDS": Example(),
    "D2R_RECONCILE_SECONDS": Example(),
    "D2R_MAX_ATTEMPTS": Example(
        note="Attempts per study, and the claim a worker renews while it works (a dead worker's "
        "study is re-queued when the lease runs out)."
    ),
    "D2R_CLAIM_LEASE_SECONDS": Example(),
    "D2R_CLAIM_HEARTBEAT_SECONDS": Example(),
    "D2R_BROKER_URL": Example(
        "sentinel://d2r-redis-0.d2r-redis:26379;sentinel://d2r-redis-1.d2r-redis:26379;"
        "sentinel://d2r-redis-2.d2r-redis:26379",
        note="Redis Sentinel (redis.yaml): the three Sentinels, and the master name they monitor.",
    ),
    "D2R_BROKER_SENTINEL_MASTER": Example(),
    "D2R_TASK_TIME_LIMIT": Example(
        note="The worker's terminationGracePeriodSeconds (720) must exceed the task time limit "
        "plus a send."
    ),
    "D2R_VISIBILITY_TIMEOUT": Example("720"),
    "D2R_MODEL": Example("/opt/d2r/models/d2r-net"),
    "D2R_WORKER_CONCURRENCY": Example(),
    "D2R_DEVICE": Example("cuda"),
    "D2R_BATCH_MAX": Example(
        "8",
        note="Studies per model batch (each keeps its own claim) and how long to wait to fill one.",
    ),
    "D2R_BATCH_WAIT_MS": Example(),
    "D2R_SEND_RETRIES": Example(),
    "D2R_SEND_RETRY_DELAY": Example(),
    "D2R_DESTINATIONS": Example(
        "PACS@pacs.example.org:104",
        note="Comma-separated AET@host:port that receive the SRs (the PACS; it must accept "
        "Comprehensive SR and Basic Text SR).",
    ),
    "D2R_DICOM_ASSOCIATION_IDLE_SECONDS": Example(),
    "D2R_TEXT_SR": Example(),
    "D2R_HTTP_PORT": Example(),
    "D2R_HTTP_HOST": Example(
        "0.0.0.0",
        note="Probes and Prometheus scrapes come from outside the pod: off loopback, everything "
        "but /healthz and /readyz needs a credential (Secret d2r-http-credentials, "
        "docs/security.md).",
    ),
    "D2R_HTTP_TOKENS_FILE": Example("/etc/d2r/http/tokens"),
    "D2R_HTTP_USERS_FILE": Example(
        "/etc/d2r/http/users",
        note="HTTPS: mount a certificate (e.g. from cert-manager) and set D2R_HTTP_TLS_CERT and "
        "D2R_HTTP_TLS_KEY; then the probes need `scheme: HTTPS` and Prometheus `scheme: https`. "
        "STOW-RS senders (POST /dicom-web/studies) need a token with the ingest role, or with "
        "D2R_HTTP_TLS_CA a client certificate signed by that CA; D2R_STOW_MAX_BYTES caps a "
        "request (disk, not memory: parts stream to the spool), D2R_STOW_MAX_CONCURRENT the "
        "requests at once.",
    ),
    "D2R_LOG_LEVEL": Example(),
}

_VALUE_LINE = re.compile(r"^#? ?D2R_[A-Z0-9_]+=")
_YAML_PLAIN = re.compile(r"[A-Za-z/][A-Za-z0-9_./@:;,=+-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _comment(text: str, prefix: str = "# ") -> list[str]:
    lines = textwrap.wrap(text, WIDTH - len(prefix), break_long_words=False, break_on_hyphens=False)
    for line in lines:
        if _VALUE_LINE.match(f"# {line}"):  # prose must never read as a setting's line
            raise ValueError(f"a comment line reads as a setting: {line!r}")
    return [f"{prefix}{line}".rstrip() for line in lines]


def _value(setting: Setting[Any], example: Example) -> str:
    value = setting.text_default if example.value is None else example.value
    if not value:
        raise ValueError(f"{setting.name}: the example needs a value (the default is computed)")
    return value


def readme_table(settings: Sequence[Setting[Any]]) -> list[str]:
    """The README's configuration table."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    lines += [f"| `{s.name}` | {s.shown_default} | {s.doc} |" for s in settings]
    return lines


def env_example(settings: Sequence[Setting[Any]]) -> list[str]:
    """The systemd example's settings, by section."""
    lines: list[str] = []
    group = None
    for setting in settings:
        if setting.group is not group:
            group = setting.group
            lines += ["", f"# --- {group.value} ---"]
            if group in SYSTEMD_SECTIONS:
                lines += _comment(SYSTEMD_SECTIONS[group])
        example = SYSTEMD.get(setting.name, Example())
        if not example.line:
            lines += _comment(f"{setting.name}: {setting.plain_doc}")
            lines += _comment(example.note)
            continue
        lines += _comment(setting.plain_doc)
        if example.note:
            lines += _comment(example.note)
        lines.append(f"{'' if example.active else '# '}{setting.name}={_value(setting, example)}")
        for note, value in example.alternatives:
            lines += _comment(note) if note else []
            lines.append(f"# {setting.name}={value}")
    return lines[1:]


def _yaml_scalar(text: str) -> str:
    if _YAML_PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS and ": " not in text:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def configmap_data(settings: Sequence[Setting[Any]]) -> list[str]:
    """The ConfigMap's data entries (indented two spaces)."""
    lines: list[str] = []
    for setting in settings:
        example = KUBERNETES.get(setting.name)
        if example is None:
            continue
        if example.note:
            lines += _comment(example.note, "  # ")
        lines.append(f"  {setting.name}: {_yaml_scalar(_value(setting, example))}")
    return lines


def _replace(text: str, target: Target, body: list[str], where: Path) -> str:
    """``text`` with its marker lines, and the lines between them, replaced by ``body`` between
    the markers."""
    lines = text.splitlines()
    begin, end = target.markers()
    starts = [i for i, line in enumerate(lines) if line.startswith(target.opening + BEGIN)]
    ends = [i for i, line in enumerate(lines) if line.startswith(target.opening + END)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"{where}: expected one {BEGIN} line and one {END} line after it")
    return "\n".join([*lines[: starts[0]], begin, *body, end, *lines[ends[0] + 1 :]]) + "\n"


def _check_profiles(settings: Sequence[Setting[Any]]) -> None:
    names = {s.name for s in settings}
    for profile, label in ((SYSTEMD, "SYSTEMD"), (KUBERNETES, "KUBERNETES")):
        unknown = sorted(set(profile) - names)
        if unknown:
            raise ValueError(f"{label} names settings nobody declares: {', '.join(unknown)}")


@dataclass(frozen=True)
class Target:
    """A generated part: its file, how its marker lines are written, and its lines."""

    path: Path
    render: Callable[[Sequence[Setting[Any]]], list[str]]
    opening: str = "# "
    closing: str = ""

    def markers(self) -> tuple[str, str]:
        """The ``BEGIN`` and ``END`` marker lines."""
        return (
            f"{self.opening}{BEGIN}: made by {COMMAND}; do not edit{self.closing}",
            f"{self.opening}{END}{self.closing}",
        )


TARGETS = (
    Target(README, readme_table, "<!-- ", " -->"),
    Target(ENV_EXAMPLE, env_example),
    Target(CONFIGMAP, configmap_data, "  # "),
)


def generate(root: Path = ROOT) -> dict[Path, tuple[str, str]]:
    """``path -> (current text, generated text)`` of each target under ``root``.

    Raises
    ------
    ValueError
        When a file lacks its markers or an example names an undeclared setting.
    """
    settings = declared_settings()
    _check_profiles(settings)
    out: dict[Path, tuple[str, str]] = {}
    for target in TARGETS:
        text = (root / target.path).read_text(encoding="utf-8")
        out[target.path] = (text, _replace(text, target, target.render(settings), target.path))
    return out


def stale(root: Path = ROOT) -> list[Path]:
    """The targets whose generated part differs from what the declarations give."""
    return [path for path, (old, new) in generate(root).items() if old != new]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.settings_docs", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the generated parts")
    mode.add_argument("--check", action="store_true", help="exit 1 if one is stale")
    args = parser.parse_args(argv)
    if args.check:
        late = stale()
        if late:
            names = ", ".join(str(p) for p in late)
            print(f"settings documentation is stale in {names}; run: {COMMAND}", file=sys.stderr)
            return 1
        print("settings documentation is current")
        return 0
    for path, (old, new) in generate().items():
        if old != new:
            (ROOT / path).write_text(new, encoding="utf-8")
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
