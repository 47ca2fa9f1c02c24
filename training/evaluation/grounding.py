"""Grounding metrics on phantom data, whose generator knows the true box of every finding
sentence (``gt_sentences`` in ``studies.jsonl``).

- ``grounding_precision``: of the generated sentences that have boxes, the share grounded
  correctly: one of its boxes has IoU >= 0.5 with a true box of the same class (a box that a
  reference finding sentence states).
- ``grounding_recall``: of the reference finding sentences, the share for which a generated
  sentence is grounded correctly in one of its true boxes.
- ``contradictions``: boxes presented as findings of the report (tied to a sentence) whose
  observation the text denies on that side, plus sentence-box ties whose sentence states the
  other side than the box's centre.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from d2r_core.geometry import Box, iou
from report.grounding import (
    BILATERAL,
    MIDLINE_CLASSES,
    Grounding,
    box_side,
    ground,
)

IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class GroundingCase:
    """One study: generated findings and boxes, and the reference's sentences and boxes.

    ``gt_sentences`` holds, per reference finding sentence, the indices of its boxes in
    ``gt_lesions``.
    """

    findings: str
    pred_lesions: tuple[tuple[str, Box], ...]
    gt_lesions: tuple[tuple[str, Box], ...]
    gt_sentences: tuple[tuple[int, ...], ...]
    columns: int
    rows: int


def _hits(box: tuple[str, Box], truth: Sequence[tuple[str, Box]], indices: Sequence[int]) -> bool:
    return any(truth[j][0] == box[0] and iou(box[1], truth[j][1]) >= IOU_THRESHOLD for j in indices)


def contradictions(grounding: Grounding, boxes: Sequence[tuple[str, Box]], columns: int) -> int:
    """Contradictions between the text and the boxes it presents (see the module docstring).

    Reads only the ties in ``grounding``, so a hand-made grounding with a wrong tie counts.
    """
    count = 0
    denied = [m for s in grounding.findings for m in s.mentions if m.negated]
    for sentence in grounding.sentences:
        for index in sentence.lesions:
            class_name, box = boxes[index]
            side = box_side(box, columns)
            if any(
                m.class_name == class_name
                and (m.laterality in (None, BILATERAL) or side is None or m.laterality == side)
                for m in denied
            ):
                count += 1  # presented, but the text denies it
                continue
            said = [m for m in sentence.positive if m.class_name == class_name]
            if class_name in MIDLINE_CLASSES:
                continue
            if not said or all(
                m.laterality not in (None, BILATERAL) and side is not None and m.laterality != side
                for m in said
            ):
                count += 1  # tied to a sentence that states another side (or not the class)
    return count


def score_case(case: GroundingCase) -> dict[str, int]:
    """Counts for one study: grounded sentences (correct), true sentences (found), ties that
    contradict, and the boxes grounding withheld from the report by reason."""
    g = ground(case.findings, "", case.pred_lesions, case.columns, case.rows)
    grounded = [s for s in g.findings if s.grounded]
    correct = sum(
        any(
            _hits(case.pred_lesions[b], case.gt_lesions, [j for t in case.gt_sentences for j in t])
            for b in s.lesions
        )
        for s in grounded
    )
    found = sum(
        any(_hits(case.pred_lesions[b], case.gt_lesions, t) for s in grounded for b in s.lesions)
        for t in case.gt_sentences
    )
    withheld = {"negated": 0, "contradicted": 0, "mislocated": 0, "omitted": 0}
    for lesion in g.lesions:
        if lesion.status in withheld:
            withheld[lesion.status] += 1
    return {
        "grounded_sentences": len(grounded),
        "grounded_correct": correct,
        "true_sentences": len(case.gt_sentences),
        "true_found": found,
        "ungrounded_sentences": sum(s.localised and not s.grounded for s in g.findings),
        "contradictions": contradictions(g, case.pred_lesions, case.columns),
        **{f"boxes_{k}": v for k, v in withheld.items()},
    }


def compute_grounding(cases: Sequence[GroundingCase]) -> dict[str, Any]:
    """``grounding_precision``, ``grounding_recall``, ``contradictions`` and the counts."""
    totals: dict[str, int] = {}
    for case in cases:
        for key, value in score_case(case).items():
            totals[key] = totals.get(key, 0) + value
    grounded, true = totals.get("grounded_sentences", 0), totals.get("true_sentences", 0)
    return {
        "grounding_precision": totals["grounded_correct"] / grounded if grounded else None,
        "grounding_recall": totals["true_found"] / true if true else None,
        "contradictions": totals.get("contradictions", 0),
        "counts": {"studies": len(cases), **totals},
        "iou_threshold": IOU_THRESHOLD,
    }


__all__ = [
    "IOU_THRESHOLD",
    "GroundingCase",
    "compute_grounding",
    "contradictions",
    "score_case",
]
