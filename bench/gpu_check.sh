#!/usr/bin/env bash
# GPU check of D2R-Net: inference backends on the `paper` preset, then mixed-precision training.
#
# Usage (from a copy of this repository on a machine with PyTorch + CUDA, no network):
#   bench/gpu_check.sh [--iters N] [--batch N] [--checkpoint DIR]
# Uses the python3 that holds torch (PYTHON overrides it); imports the repository through
# PYTHONPATH and installs nothing. Two tables: inference (bench/inference/gpu.py: backends, then
# Predictor.predict against predict_batch at --batch studies per call; the options
# above) and a short mixed-precision training run (bench/training/gpu_train.py). Stops after
# 8 minutes at the latest. Tables and tracebacks of failed stages go to $OUT (or a temp dir).
# Without CUDA it stops at once (exit 1); both Python checks take --device cpu for a dry run.
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
for m in ["onnx", "onnxscript", "onnxruntime", "tensorrt", "pydicom", "transformers"]:
    print(f"gpu_check: {m} {'present' if u.find_spec(m) else 'absent'}", flush=True)
import torch
if not torch.cuda.is_available():
    raise SystemExit(
        f"gpu_check: CUDA is not available to torch {torch.__version__} (CUDA build "
        f"{torch.version.cuda or 'none'}): nothing to check. A CPU dry run of the logic: "
        "bench/inference/gpu.py --device cpu --preset small"
    )
PY
out="${OUT:-$(mktemp -d -t d2r-gpu-check.XXXXXX)}"
status=0
# torch.compile runs in its own process under its own limit: inductor can outlast an in-process
# alarm. Worst case with the kill grace periods: 265 + 145 + 70 s = 8 minutes.
timeout --signal=TERM --kill-after=10 255 "$py" bench/inference/gpu.py --budget 225 \
  --stages eager,export,tensorrt,batching,auto --out "$out" "$@" || status=$?
timeout --signal=TERM --kill-after=10 135 "$py" bench/inference/gpu.py --budget 125 \
  --stages compile --append --out "$out" "$@" || status=$?
echo
cat "$out/gpu_check.md"
echo
if "$py" -c "import pydicom" 2>/dev/null; then
  timeout --signal=TERM --kill-after=10 60 "$py" bench/training/gpu_train.py --out "$out" || status=$?
else
  echo "gpu_check: training check not run (it writes phantom data with pydicom, absent)"
fi
exit "$status"
