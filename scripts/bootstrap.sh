#!/usr/bin/env bash
# Install what d2r needs on a Debian machine with Python 3.11: system packages (apt) and a
# virtual environment in .venv with d2r installed in editable mode.
#   bash scripts/bootstrap.sh            runtime (serve, node, worker)
#   bash scripts/bootstrap.sh --test     + test peers: dcmtk, Orthanc, dicom3tools, Redis, Chromium, JRE
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

apt_pkgs=(python3-venv dcmtk)
if (( want_test )); then
  # prometheus: its promtool checks and unit-tests the alert rules in deploy/prometheus
  apt_pkgs+=(orthanc orthanc-dicomweb dicom3tools redis-server postgresql haproxy chromium default-jre-headless systemd prometheus)
  # npm fetches the prebuilt OHIF viewer; a Node.js from another source may already bundle it
  # (and conflict with Debian's npm package), so ask apt only when the command is missing.
  command -v npm >/dev/null || apt_pkgs+=(nodejs npm)
fi
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's orthanc and prometheus packages start a system-wide Orthanc (4242/8042) and
# Prometheus (9090); the tests run their own Orthanc and need only promtool.
if (( want_test )) && command -v systemctl >/dev/null; then
  for service in orthanc prometheus; do
    if systemctl is-active -q "$service" 2>/dev/null; then
      systemctl stop "$service" || true
    fi
  done
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if (( want_test )); then
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e .
fi
# medspaCy (the CE labeler) without its spacy<3.8 pin: see requirements-medspacy.txt
python -m pip install -q --no-deps -r requirements-medspacy.txt
