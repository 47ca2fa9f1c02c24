#!/usr/bin/env bash
# Run the test suite against real peers (dcmtk, Orthanc, Redis, Celery, OHIF in Chromium),
# installing everything it needs first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test
bash tests/support/install-viewer.sh
bash tests/support/install-fhir-server.sh
. .venv/bin/activate
ruff check .
ruff format --check .
mypy
lint-imports
mkdir -p test-artifacts
set +e
python -m pytest -m "not gpu" --junitxml=test-artifacts/junit.xml "$@"
rc=$?
set -e
if (( rc == 0 )); then
  # A skipped test is not a passing test: every peer the suite needs must be there.
  python - <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse("test-artifacts/junit.xml").getroot()
skipped, xfailed = [], []
for case in root.iter("testcase"):
    for s in case.findall("skipped"):
        name = f"{case.get('classname')}::{case.get('name')}"
        (xfailed if s.get("type") == "pytest.xfail" else skipped).append(name)
for name in xfailed:
    print(f"expected failure (a known gap, not a pass): {name}")
if skipped:
    print(f"{len(skipped)} test(s) skipped: a peer or tool is missing", file=sys.stderr)
    print("\n".join(skipped), file=sys.stderr)
    sys.exit(1)
PY
fi
exit $rc
