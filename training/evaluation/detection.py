"""Detection mAP@0.5 over the 22 VinDr-CXR classes (all-point interpolated AP).

>>> gt = {"a": [("A", (0, 0, 10, 10))]}
>>> pred = {"a": [("A", 0.9, (0, 0, 10, 10))]}
>>> compute_detection(gt, pred, classes=("A",))["map50"]
1.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from d2r_core.classes import VINDR_CLASSES
from d2r_core.geometry import Box, iou

IOU_THRESHOLD = 0.5


def average_precision(tp: Sequence[bool], n_gt: int) -> float:
    """All-point interpolated AP of predictions already sorted by descending score."""
    if n_gt == 0:
        raise ValueError("n_gt: AP is undefined without ground truth")
    hits = np.asarray(tp, dtype=np.float64)
    if hits.size == 0:
        return 0.0
    ctp = np.cumsum(hits)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, hits.size + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def compute_detection(
    gt: Mapping[str, Sequence[tuple[str, Box]]],
    pred: Mapping[str, Sequence[tuple[str, float, Box]]],
    *,
    classes: Sequence[str] = VINDR_CLASSES,
    iou_threshold: float = IOU_THRESHOLD,
) -> dict[str, Any]:
    """Per-class AP at ``iou_threshold`` and ``map50`` (mean over classes with ground truth).

    Parameters
    ----------
    gt : mapping
        image id -> [(class_name, box)].
    pred : mapping
        image id -> [(class_name, score, box)].
    """
    per_class: dict[str, dict[str, Any]] = {}
    for c in classes:
        gts = {k: [b for n, b in v if n == c] for k, v in gt.items()}
        n_gt = sum(len(v) for v in gts.values())
        preds = sorted(
            ((s, k, b) for k, v in pred.items() for n, s, b in v if n == c), key=lambda t: -t[0]
        )
        used = {k: [False] * len(v) for k, v in gts.items()}
        tp: list[bool] = []
        for _score, k, box in preds:
            best, best_j = 0.0, -1
            for j, g in enumerate(gts.get(k, [])):
                if not used[k][j]:
                    o = iou(box, g)
                    if o > best:
                        best, best_j = o, j
            hit = best_j >= 0 and best >= iou_threshold
            if hit:
                used[k][best_j] = True
            tp.append(hit)
        ap = average_precision(tp, n_gt) if n_gt else None
        per_class[c] = {"ap": ap, "n_gt": n_gt, "n_pred": len(preds)}
    aps = [v["ap"] for v in per_class.values() if v["ap"] is not None]
    return {
        "map50": float(np.mean(aps)) if aps else None,
        "iou_threshold": iou_threshold,
        "per_class": per_class,
    }


__all__ = ["IOU_THRESHOLD", "average_precision", "compute_detection"]
