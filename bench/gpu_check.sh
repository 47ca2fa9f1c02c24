#!/usr/bin/env bash
# GPU check of the inference backends on the `paper` preset; prints one Markdown table.
#
# Usage (from a copy of this repository on a machine with PyTorch + CUDA, no network):
#   bench/gpu_check.sh [--iters N] [--batch N] [--budget SECONDS]
# Uses the python3 that holds torch (PYTHON overrides it); imports the repository through
# PYTHONPATH and installs nothing. Stops after 8 minutes at the latest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
"$py" - <<'PY'
import importlib.util as u
need = ["torch", "torchvision", "safetensors", "numpy"]
missing = [m for m in need if u.find_spec(m) is None]
if missing:
    raise SystemExit(f"gpu_check: missing Python packages: {', '.join(missing)}")
for m in ["onnx", "onnxscript", "onnxruntime", "tensorrt", "pydicom"]:
    print(f"gpu_check: {m} {'present' if u.find_spec(m) else 'absent'}", flush=True)
PY
exec timeout --signal=TERM --kill-after=10 470 "$py" bench/inference/gpu.py "$@"
