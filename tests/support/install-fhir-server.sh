#!/bin/sh
# Install the FHIR R4 test server's npm packages (Medplum's router, validator and R4
# definitions, pinned in tests/support/fhir_server/package-lock.json), quietly and idempotently.
set -eu
cd "$(dirname "$0")/fhir_server"
if ! command -v npm >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
[ -d node_modules/@medplum/fhir-router ] || npm ci --no-audit --no-fund --loglevel=error >/dev/null
