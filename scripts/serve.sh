#!/usr/bin/env bash
# Quick start: install what is needed, then run `d2r serve` (listener + worker, embedded queue).
# Configuration comes from D2R_* environment variables (README); D2R_MODEL names the checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/d2r serve "$@"
