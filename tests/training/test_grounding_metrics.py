"""Grounding precision, recall and contradictions against hand-made cases."""

from __future__ import annotations

import json

import pytest

from d2r_core.geometry import iou
from report.grounding import Grounding, LesionGrounding, Sentence, mentions
from training.evaluation import evaluate_records
from training.evaluation.grounding import (
    GroundingCase,
    compute_grounding,
    contradictions,
    score_case,
)
from training.evaluation.records import record_from_dict

SIZE = 1000
LEFT_LOWER = (650.0, 550.0, 850.0, 750.0)
RIGHT_LOWER = (150.0, 550.0, 350.0, 750.0)
EFFUSION = "Small left pleural effusion."


def case(
    findings: str,
    pred: list[tuple[str, tuple[float, float, float, float]]],
    gt: list[tuple[str, tuple[float, float, float, float]]] | None = None,
    sentences: tuple[tuple[int, ...], ...] = ((0,),),
) -> GroundingCase:
    truth = [("Pleural effusion", LEFT_LOWER)] if gt is None else gt
    return GroundingCase(findings, tuple(pred), tuple(truth), sentences, SIZE, SIZE)


def test_iou() -> None:
    assert iou(LEFT_LOWER, LEFT_LOWER) == 1.0
    assert iou(LEFT_LOWER, RIGHT_LOWER) == 0.0
    assert iou((0, 0, 10, 10), (0, 0, 10, 20)) == pytest.approx(0.5)


def test_sentence_grounded_in_its_true_box() -> None:
    s = score_case(case(EFFUSION, [("Pleural effusion", (660.0, 560.0, 850.0, 750.0))]))
    assert (s["grounded_sentences"], s["grounded_correct"]) == (1, 1)
    assert (s["true_sentences"], s["true_found"]) == (1, 1)
    assert s["contradictions"] == 0


def test_box_below_iou_threshold_is_not_correct() -> None:
    # the same side and zone, so it is tied, but it overlaps the true box by IoU 1/3
    s = score_case(case(EFFUSION, [("Pleural effusion", (750.0, 550.0, 950.0, 750.0))]))
    assert (s["grounded_sentences"], s["grounded_correct"], s["true_found"]) == (1, 0, 0)


def test_box_of_another_class_is_not_correct() -> None:
    s = score_case(
        case(
            "Hazy opacity in the left lower lung.",
            [("Lung Opacity", LEFT_LOWER)],
            gt=[("Pleural effusion", LEFT_LOWER)],
        )
    )
    assert (s["grounded_sentences"], s["grounded_correct"], s["true_found"]) == (1, 0, 0)


def test_ungrounded_sentence_misses_recall() -> None:
    s = score_case(case(EFFUSION, []))
    assert (s["grounded_sentences"], s["true_found"], s["ungrounded_sentences"]) == (0, 0, 1)


def test_box_on_the_wrong_side_is_withheld_not_tied() -> None:
    s = score_case(case(EFFUSION, [("Pleural effusion", RIGHT_LOWER)]))
    assert (s["grounded_sentences"], s["boxes_mislocated"], s["contradictions"]) == (0, 1, 0)


def test_box_presented_while_the_text_denies_it_is_a_contradiction() -> None:
    """A hand-made grounding that ties a box the findings also deny: counted."""
    text = f"No pleural effusion. {EFFUSION}"
    sentences = tuple(
        Sentence(t, "findings", mentions(t), lesions)
        for t, lesions in (("No pleural effusion.", ()), (EFFUSION, (0,)))
    )
    tied = Grounding(
        sentences, (LesionGrounding("Pleural effusion", "reported", 1, "left", (0.55, 0.75)),)
    )
    assert contradictions(tied, [("Pleural effusion", LEFT_LOWER)], SIZE) == 1
    # grounding itself withholds such a box: nothing presented, nothing contradicts
    s = score_case(case(text, [("Pleural effusion", LEFT_LOWER)]))
    assert (s["boxes_contradicted"], s["contradictions"]) == (1, 0)


def test_negated_box_is_withheld_not_a_contradiction() -> None:
    s = score_case(case("No pleural effusion.", [("Pleural effusion", LEFT_LOWER)]))
    assert (s["boxes_negated"], s["contradictions"], s["true_found"]) == (1, 0, 0)


def _tied(text: str, box: tuple[float, float, float, float]) -> int:
    grounding = Grounding(
        (Sentence(text, "findings", mentions(text), (0,)),),
        (LesionGrounding("Pleural effusion", "reported", 0, None, (0.55, 0.75)),),
    )
    return contradictions(grounding, [("Pleural effusion", box)], SIZE)


def test_tie_whose_side_disagrees_is_a_contradiction() -> None:
    assert _tied(EFFUSION, RIGHT_LOWER) == 1
    assert _tied(EFFUSION, LEFT_LOWER) == 0
    assert _tied("Bilateral pleural effusions.", RIGHT_LOWER) == 0


def test_aggregate() -> None:
    good = case(EFFUSION, [("Pleural effusion", LEFT_LOWER)])
    missed = case(EFFUSION, [])
    wrong = case(EFFUSION, [("Pleural effusion", (750.0, 550.0, 950.0, 750.0))])
    m = compute_grounding([good, missed, wrong])
    assert m["grounding_precision"] == pytest.approx(1 / 2)
    assert m["grounding_recall"] == pytest.approx(1 / 3)
    assert m["contradictions"] == 0
    assert compute_grounding([missed])["grounding_precision"] is None


def test_evaluate_reports_grounding_from_records() -> None:
    record = record_from_dict(
        json.loads(
            json.dumps(
                {
                    "id": "s1",
                    "reference": EFFUSION,
                    "generated": EFFUSION,
                    "gt_lesions": [{"class_name": "Pleural effusion", "box": list(LEFT_LOWER)}],
                    "pred_lesions": [
                        {"class_name": "Pleural effusion", "box": list(LEFT_LOWER), "score": 0.9}
                    ],
                    "gt_sentences": [{"text": EFFUSION, "lesions": [0]}],
                    "columns": SIZE,
                    "rows": SIZE,
                }
            )
        )
    )
    metrics = evaluate_records([record], nlg=False)
    assert metrics["grounding_precision"] == 1.0
    assert metrics["grounding_recall"] == 1.0
    assert metrics["contradictions"] == 0


def test_records_reject_bad_sentence_indices() -> None:
    with pytest.raises(ValueError, match="gt_sentences"):
        record_from_dict(
            {
                "id": "s",
                "reference": "r",
                "generated": "g",
                "gt_lesions": [],
                "gt_sentences": [{"lesions": [0]}],
            }  # fmt: skip
        )


def test_phantom_sentences_know_their_boxes_and_grounding_finds_them() -> None:
    """The generator's ground truth: every lesion is stated by exactly one findings sentence,
    and grounding the reference report in the true boxes ties each box to that sentence."""
    from report.grounding import ground
    from training.phantom import render, sample_study
    from training.phantom_report import write_report

    size, tied = 128, 0
    for index in range(60):
        study = sample_study(20261127, index)
        report = write_report(study)
        assert " ".join(text for text, _ in report.sentences) == report.findings
        stated = sorted(i for _, lesions in report.sentences for i in lesions)
        assert stated == list(range(len(study.lesions)))
        boxes = [
            (le.class_name, (b[0] * size, b[1] * size, b[2] * size, b[3] * size))
            for le, b in zip(study.lesions, render(study, size, noise=False).boxes, strict=True)
        ]
        g = ground(report.findings, report.impression, boxes, size, size)
        for i in range(len(boxes)):
            (truth,) = [text for text, lesions in report.sentences if i in lesions]
            assert g.sentence_of(i) == truth
            tied += 1
        assert g.dropped_impression == ()
        assert not [s.text for s in g.findings if s.localised and not s.grounded]
    assert tied > 50
