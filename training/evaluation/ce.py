"""Clinical efficacy (CE) variants over the rule-based labeler's 14 observations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from training.evaluation.labeler import CHEXPERT_OBSERVATIONS, Label

F1_5_OBSERVATIONS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CE_COLUMN = "CE-rb (rule-based CheXpert-style, 14 obs.)"
CE_FOOTNOTE = (
    "CE computed with an in-house rule-based labeler: the CheXpert labeler's phrase lists and "
    "aggregation rules, with negation/uncertainty by medspaCy ConText and report sections (not "
    "NegBio dependency patterns). Positive = label 1; uncertain and blank treated as negative "
    "unless stated. Not directly comparable with CE numbers in papers that used the original "
    "CheXpert labeler or CheXbert."
)


def binarise(
    labels: Sequence[dict[str, Label]],
    *,
    uncertain_positive: bool,
    observations: Sequence[str] = CHEXPERT_OBSERVATIONS,
) -> np.ndarray:
    """(n_reports, n_observations) 0/1 matrix; 1 (and -1 if ``uncertain_positive``) -> 1."""
    wanted = {1, -1} if uncertain_positive else {1}
    return np.array(
        [[int(lab.get(o) in wanted) for o in observations] for lab in labels], dtype=np.int64
    ).reshape(len(labels), len(observations))


def _prf(gt: np.ndarray, pred: np.ndarray, average: str) -> dict[str, float]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(gt, pred, average=average, zero_division=0)
    return {"precision": float(p), "recall": float(r), "f1": float(f)}


def _example_based(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    ps, rs, fs = [], [], []
    for g, p in zip(gt, pred, strict=True):
        tp = int((g & p).sum())
        if g.sum() == 0 and p.sum() == 0:
            ps.append(1.0)
            rs.append(1.0)
            fs.append(1.0)
            continue
        prec = tp / p.sum() if p.sum() else 0.0
        rec = tp / g.sum() if g.sum() else 0.0
        ps.append(prec)
        rs.append(rec)
        fs.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    n = max(len(ps), 1)
    return {"precision": sum(ps) / n, "recall": sum(rs) / n, "f1": sum(fs) / n}


def compute_ce(
    ref_labels: Sequence[dict[str, Label]], gen_labels: Sequence[dict[str, Label]]
) -> dict[str, Any]:
    """All CE variants: pos_only, unc_as_pos, example_based, f1_5 and per_label."""
    out: dict[str, Any] = {"column": CE_COLUMN, "footnote": CE_FOOTNOTE}
    for key, unc in (("pos_only", False), ("unc_as_pos", True)):
        gt = binarise(ref_labels, uncertain_positive=unc)
        pr = binarise(gen_labels, uncertain_positive=unc)
        out[key] = {"micro": _prf(gt, pr, "micro"), "macro": _prf(gt, pr, "macro")}
    gt = binarise(ref_labels, uncertain_positive=False)
    pr = binarise(gen_labels, uncertain_positive=False)
    out["example_based"] = _example_based(gt, pr)
    out["f1_5"] = {}
    for key, unc in (("pos_only", False), ("unc_as_pos", True)):
        g5 = binarise(ref_labels, uncertain_positive=unc, observations=F1_5_OBSERVATIONS)
        p5 = binarise(gen_labels, uncertain_positive=unc, observations=F1_5_OBSERVATIONS)
        out["f1_5"][key] = {"micro": _prf(g5, p5, "micro"), "macro": _prf(g5, p5, "macro")}
    per_label = {}
    for j, obs in enumerate(CHEXPERT_OBSERVATIONS):
        stats = _prf(gt[:, j], pr[:, j], "binary")
        per_label[obs] = {"support": int(gt[:, j].sum()), **stats}
    out["per_label"] = per_label
    return out


__all__ = ["CE_COLUMN", "CE_FOOTNOTE", "F1_5_OBSERVATIONS", "binarise", "compute_ce"]
