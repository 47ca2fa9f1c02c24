"""Evaluation: golden NLG values, labeler cases, CE, detection toy, input errors."""

from __future__ import annotations

import pytest

from training.errors import EvaluationInputError
from training.evaluation import EvalRecord, evaluate_records, parse_records
from training.evaluation.ce import compute_ce
from training.evaluation.detection import compute_detection
from training.evaluation.labeler import label_report
from training.evaluation.normalise import r2gen_clean

TOY = [
    (
        "toy-1",
        "The heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
        "Heart size is normal. Lungs are clear. No pleural effusion or pneumothorax.",
    ),
    (
        "toy-2",
        "Moderate cardiomegaly. Small left pleural effusion with adjacent atelectasis.",
        "Mild cardiomegaly. Small bilateral pleural effusions.",
    ),
    (
        "toy-3",
        "Right upper lobe consolidation, concerning for pneumonia. No pneumothorax.",
        "No focal consolidation. No pneumothorax. The cardiomediastinal silhouette is normal.",
    ),
    (
        "toy-4",
        "Endotracheal tube terminates 4.5 cm above the carina. Lungs are clear.",
        "Endotracheal tube is 4 cm above the carina. The lungs are clear.",
    ),
]
GOLDEN = {
    "r2gen": (0.691768, 0.612918, 0.546570, 0.481317, 0.375821, 0.670528, 3.836466),
    "coco": (0.626227, 0.538970, 0.452481, 0.382862, 0.351954, 0.601033, 3.268305),
}
KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def test_r2gen_cleaning_drops_decimal_point() -> None:
    assert r2gen_clean(TOY[3][1]) == (
        "endotracheal tube terminates 45 cm above the carina . lungs are clear ."
    )


@pytest.mark.parametrize("mode", ["r2gen", "coco"])
def test_nlg_golden_values(mode: str) -> None:
    # records in reverse order: scoring sorts by id
    m = evaluate_records([EvalRecord(*t) for t in reversed(TOY)], nlg_mode=mode)
    for key, want in zip(KEYS, GOLDEN[mode], strict=True):
        assert m[key] == pytest.approx(want, abs=1e-4), key
    assert m["meta"]["nlg_mode"] == mode and m["map50"] is None
    assert len(m["per_report"]) == 4 and m["per_report"][0]["id"] == "toy-1"
    assert "spice" in m["not_computed"]


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        (
            "No pleural effusion or pneumothorax.",
            {"Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1},
        ),
        ("Possible right lower lobe pneumonia.", {"Pneumonia": -1}),
        ("Pneumonia cannot be excluded.", {"Pneumonia": -1}),
        ("Heart size is normal.", {"Cardiomegaly": 0}),
        ("ET tube 4 cm above the carina.", {"Support Devices": 1, "No Finding": 1}),
        (
            "Right upper lobe consolidation, concerning for pneumonia.",
            {"Consolidation": 1, "Pneumonia": -1, "No Finding": None},
        ),
        ("Findings suggest chf.", {"Edema": -1, "Cardiomegaly": -1}),
    ],
)
def test_labeler_cases(sentence: str, expected: dict[str, int | None]) -> None:
    labels = label_report(sentence)
    for key, want in expected.items():
        assert labels[key] == want, (sentence, key, labels)


def test_ce_variants_on_a_known_case() -> None:
    refs = [label_report("Cardiomegaly. Small left pleural effusion."), label_report("Clear.")]
    gens = [label_report("Cardiomegaly. No pleural effusion."), label_report("Clear.")]
    ce = compute_ce(refs, gens)
    assert ce["pos_only"]["micro"]["precision"] == pytest.approx(1.0)
    # ref positives: Cardiomegaly, Pleural Effusion, No Finding (report 2); gen finds 2 of 3
    assert ce["pos_only"]["micro"]["recall"] == pytest.approx(2 / 3)
    assert ce["per_label"]["Pleural Effusion"]["support"] == 1
    assert ce["per_label"]["Pleural Effusion"]["recall"] == 0.0
    assert ce["example_based"]["recall"] == pytest.approx((0.5 + 1.0) / 2)


def test_detection_toy() -> None:
    classes = ("A", "B", "C")
    gt = {"i1": [("A", (0, 0, 10, 10)), ("B", (50, 50, 60, 60))], "i2": [("A", (0, 0, 10, 10))]}
    pred = {
        "i1": [("A", 0.9, (0, 0, 10, 10)), ("A", 0.8, (30, 30, 40, 40)), ("C", 0.5, (0, 0, 5, 5))],
        "i2": [("A", 0.7, (1, 1, 10, 10))],
    }
    det = compute_detection(gt, pred, classes=classes)
    assert det["per_class"]["A"]["ap"] == pytest.approx(0.8333, abs=1e-4)
    assert det["per_class"]["B"]["ap"] == 0.0
    assert det["per_class"]["C"]["ap"] is None and det["per_class"]["C"]["n_pred"] == 1
    assert det["map50"] == pytest.approx(0.4167, abs=1e-4)


def test_empty_generated_is_scored() -> None:
    recs = [EvalRecord("a", "No pleural effusion.", ""), EvalRecord(*TOY[0])]
    m = evaluate_records(recs)
    assert m["meta"]["n"] == 2 and 0.0 < m["bleu_1"] < 1.0
    # r2gen turns "" into " ." (only the final period), so it scores low but is not dropped
    assert m["per_report"][0]["id"] == "a"
    assert m["per_report"][0]["rouge_l"] < m["per_report"][1]["rouge_l"]


def test_invalid_lines_reported_by_number() -> None:
    lines = [
        '{"id": "a", "reference": "x.", "generated": ""}',
        "not json",
        '{"id": "b", "reference": "", "generated": "y"}',
        '{"id": "c", "reference": "x.", "generated": "y", "pred_lesions": '
        '[{"class_name": "Nope", "box": [0, 0, 1, 1], "score": 0.5}]}',
        '{"id": "a", "reference": "x.", "generated": ""}',
    ]
    with pytest.raises(EvaluationInputError) as err:
        parse_records(lines)
    text = str(err.value)
    for n in (2, 3, 4, 5):
        assert f"line {n}:" in text
    assert "line 1:" not in text


def test_abstained_studies_count_in_abstain_rate_and_nowhere_else() -> None:
    from training.evaluation import evaluate_records
    from training.evaluation.records import record_from_dict

    box = {"class_name": "Pleural effusion", "box": [10.0, 10.0, 50.0, 50.0]}
    accepted = {
        "reference": "There is a small left pleural effusion.",
        "generated": "There is a small left pleural effusion.",
        "gt_lesions": [box],
        "pred_lesions": [{**box, "score": 0.9}],
    }
    declined = {  # nothing generated: scored, it would pull every metric down
        "reference": "There is a small left pleural effusion.",
        "generated": "",
        "gt_lesions": [box],
        "pred_lesions": [],
        "abstained": True,
    }
    records = [
        record_from_dict({"id": "a", **accepted}),
        record_from_dict({"id": "b", **accepted}),
        record_from_dict({"id": "c", **declined}),
    ]
    metrics = evaluate_records(records, nlg=False)
    assert metrics["abstain_rate"] == pytest.approx(1 / 3)
    assert metrics["meta"]["n"] == 2 and metrics["meta"]["n_abstained"] == 1
    assert metrics["map50"] == pytest.approx(1.0)
    with_all = evaluate_records(
        [*records[:2], record_from_dict({"id": "c", **declined, "abstained": False})], nlg=False
    )
    assert with_all["abstain_rate"] == 0.0 and with_all["map50"] < 1.0
