"""An abnormal phantom study that the bundled demo model reports with grounded boxes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.processes import base_env, run_d2r

#: The bundled demo model (input-gate statistics included).
DEMO_MODEL = Path(__file__).resolve().parents[2] / "models" / "d2r-demo-phantom"


def phantom_study_file(out: Path, seed: int = 41) -> Path:
    """Write one abnormal phantom study (DICOM 1024, as the demo model was validated on) under
    ``out`` and return its image file; its findings sentences state boxed lesions."""
    res = run_d2r(
        "synth", "--out", str(out), "--studies", "1", "--seed", str(seed), "--size", "64",
        "--dicom-size", "1024", "--normal-fraction", "0", env=base_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    entry = json.loads((out / "studies.jsonl").read_text().splitlines()[0])
    assert entry["gt_sentences"], entry
    return out / str(entry["dicom"][0])
