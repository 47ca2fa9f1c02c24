"""Run a checkpoint over a ``d2r synth`` folder and turn its output into evaluation records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def predict_phantom_records(
    model_dir: Path,
    data: Path,
    split: str | None = None,
    *,
    report_choice: str = "consistent",
    predictor: Any = None,
) -> list[Any]:
    """One record per study of ``data/studies.jsonl`` (``split`` None: every study).

    ``predictor`` is the model as ``d2r evaluate`` opens it (``worker.predictor``, the node's
    own path); without one the checkpoint in ``model_dir`` is opened on the CPU with
    ``report_choice`` picking the report among the beam's hypotheses as ``D2R_REPORT_CHOICE``
    does on the node (:func:`report.grounding.report_chooser`).

    Studies written without DICOM files (``d2r synth --dicom-size 0``) cannot be run and are
    left out; the records' count is reported in ``metrics.json`` (``meta.n``).
    """
    import pydicom

    from model.predict import Predictor
    from report.grounding import report_chooser
    from training.evaluation.records import record_from_dict

    if predictor is None:
        predictor = Predictor.from_checkpoint(
            model_dir, choose_report=report_chooser(report_choice)
        )
    records = []
    for line in (data / "studies.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if (split is not None and entry.get("split") != split) or not entry.get("dicom"):
            continue
        pred = predictor.predict([pydicom.dcmread(data / p) for p in entry["dicom"]])
        records.append(
            record_from_dict(
                {
                    "id": entry["id"],
                    "reference": entry["reference"],
                    "generated": pred.findings,
                    "abstained": pred.abstained,
                    "gt_lesions": entry["gt_lesions"],
                    **({"gt_sentences": entry["gt_sentences"]} if "gt_sentences" in entry else {}),
                    "columns": entry["columns"],
                    "rows": entry["rows"],
                    "pred_lesions": [
                        {"class_name": le.class_name, "score": le.score, "box": list(le.box)}
                        for le in pred.lesions
                    ],
                }
            )
        )
    return records
