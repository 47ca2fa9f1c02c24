"""Grounded findings: the rules that tie boxes to sentences and check the impression."""

from __future__ import annotations

import pytest

from report.grounding import (
    GLOBAL_NORMAL,
    Mention,
    box_side,
    consistency,
    ground,
    mentions,
    most_consistent,
    report_chooser,
    split_sentences,
)

SIZE = 1000
# boxes in a 1000 x 1000 image; the patient's right is the image's left (x < 500)
RIGHT_LOWER = (150.0, 550.0, 350.0, 750.0)
LEFT_LOWER = (650.0, 550.0, 850.0, 750.0)
RIGHT_UPPER = (150.0, 150.0, 350.0, 300.0)
LEFT_UPPER = (650.0, 150.0, 850.0, 300.0)
HEART = (380.0, 450.0, 720.0, 700.0)


def test_sentences_split_at_full_stops_not_decimals() -> None:
    assert split_sentences("A 2.5 cm nodule in the right upper lung. No effusion.") == [
        "A 2.5 cm nodule in the right upper lung.",
        "No effusion.",
    ]


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("Moderate left pleural effusion.", [Mention("Pleural effusion", False, "left")]),
        (
            "No pleural effusion or pneumothorax.",
            [Mention("Pleural effusion", True), Mention("Pneumothorax", True)],
        ),
        (
            "Hazy opacity in the right lower lung.",
            [Mention("Lung Opacity", False, "right", "lower")],
        ),
        (
            "Right upper lung pneumonia with consolidation.",
            [Mention("Consolidation", False, "right", "upper")],
        ),
        (
            "A thick-walled cavitary lesion in the left mid lung.",
            [Mention("Lung cavity", False, "left", "middle")],
        ),  # fmt: skip
        ("Interstitial pulmonary edema.", [Mention("Edema", False)]),
        ("The heart size is normal.", [Mention("Cardiomegaly", True)]),
        ("The cardiac silhouette is enlarged.", [Mention("Cardiomegaly", False)]),
        ("No acute cardiopulmonary process.", [Mention(GLOBAL_NORMAL, True)]),
        ("Fracture of the right 6th rib.", [Mention("Rib fracture", False, "right")]),
        ("The endotracheal tube tip is 4 cm above the carina.", []),
        (
            "Small left pleural effusion, no pneumothorax.",
            [Mention("Pleural effusion", False, "left"), Mention("Pneumothorax", True)],
        ),
        ("Bibasilar atelectasis.", [Mention("Atelectasis", False, "bilateral", "lower")]),
        ("The heart is not enlarged.", [Mention("Cardiomegaly", True)]),
        ("Small pericardial effusion.", []),
    ],
)
def test_mentions(sentence: str, expected: list[Mention]) -> None:
    assert list(mentions(sentence)) == expected


def test_box_side_follows_the_radiological_convention() -> None:
    assert box_side(RIGHT_LOWER, SIZE) == "right"  # image left = patient's right
    assert box_side(LEFT_LOWER, SIZE) == "left"
    assert box_side((480.0, 0.0, 510.0, 10.0), SIZE) is None  # on the midline


def test_box_tied_to_its_sentence_and_sentence_to_its_boxes() -> None:
    g = ground(
        "The heart is enlarged. Hazy opacity in the left lower lung. "
        "Nodule in the right upper lung.",
        "",
        [
            ("Nodule/Mass", RIGHT_UPPER),
            ("Lung Opacity", LEFT_LOWER),
            ("Cardiomegaly", HEART),
            ("Lung Opacity", (700.0, 600.0, 800.0, 700.0)),
        ],
        SIZE,
        SIZE,
    )
    assert [s.lesions for s in g.sentences] == [(2,), (1, 3), (0,)]
    assert [lesion.status for lesion in g.lesions] == ["reported"] * 4
    assert g.sentence_of(0) == "Nodule in the right upper lung."
    assert all(s.grounded for s in g.sentences)


def test_box_the_text_negates_is_not_reported() -> None:
    g = ground(
        "No pleural effusion. Moderate right pneumothorax.",
        "",
        [("Pleural effusion", LEFT_LOWER), ("Pneumothorax", RIGHT_UPPER)],
        SIZE,
        SIZE,
    )
    assert [lesion.status for lesion in g.lesions] == ["negated", "reported"]
    assert g.reported == (1,)
    assert g.sentence_of(0) is None


def test_box_the_text_both_states_and_denies_is_not_reported() -> None:
    g = ground(
        "Moderate right pneumothorax. No pneumothorax.",
        "Right pneumothorax.",
        [("Pneumothorax", RIGHT_UPPER)],
        SIZE,
        SIZE,
    )
    assert g.lesions[0].status == "contradicted"
    assert g.reported == () and g.sentences[0].lesions == ()
    assert g.dropped_impression == ("Right pneumothorax.",)


def test_box_the_text_omits_is_not_reported() -> None:
    g = ground("The lungs are clear.", "", [("Pneumothorax", LEFT_UPPER)], SIZE, SIZE)
    assert g.lesions[0].status == "omitted"
    assert g.reported == ()


def test_box_on_the_other_side_is_not_tied() -> None:
    """A left effusion sentence and a box on the patient's right: no tie either way."""
    g = ground("Small left pleural effusion.", "", [("Pleural effusion", RIGHT_LOWER)], SIZE, SIZE)
    assert g.lesions[0].status == "mislocated"
    sentence = g.sentences[0]
    assert sentence.localised and not sentence.grounded


def test_box_in_another_zone_is_not_tied() -> None:
    g = ground("Nodule in the right upper lung.", "", [("Nodule/Mass", RIGHT_LOWER)], SIZE, SIZE)
    assert g.lesions[0].status == "mislocated"


def test_positive_sentence_without_a_box_is_ungrounded() -> None:
    g = ground(
        "There is a moderate left pleural effusion. The heart size is normal.", "", [], SIZE, SIZE
    )
    effusion, heart = g.sentences
    assert effusion.localised and not effusion.grounded
    assert not heart.localised  # a normal statement needs no box


def test_bilateral_sentence_takes_boxes_on_both_sides() -> None:
    g = ground(
        "Mild pulmonary edema.", "", [("Edema", RIGHT_LOWER), ("Edema", LEFT_LOWER)], SIZE, SIZE
    )
    assert g.sentences[0].lesions == (0, 1)


def test_impression_keeps_only_what_the_findings_state() -> None:
    g = ground(
        "Moderate left pleural effusion. No pneumothorax.",
        "Left pleural effusion. Right lower lung nodule. Right pleural effusion. "
        "Pneumothorax. No acute cardiopulmonary process. Follow-up advised.",
        [("Pleural effusion", LEFT_LOWER)],
        SIZE,
        SIZE,
    )
    assert g.impression == "Left pleural effusion. Follow-up advised."
    assert g.dropped_impression == (
        "Right lower lung nodule.",  # omitted by the findings
        "Right pleural effusion.",  # another side than the findings
        "Pneumothorax.",  # the findings deny it
        "No acute cardiopulmonary process.",  # the findings state an effusion
    )


def test_normal_impression_of_a_normal_report_is_kept() -> None:
    g = ground(
        "The heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
        "No acute cardiopulmonary process.",
        [],
        SIZE,
        SIZE,
    )
    assert g.impression == "No acute cardiopulmonary process."
    assert g.dropped_impression == ()


def test_invalid_image_size() -> None:
    with pytest.raises(ValueError, match="columns and rows"):
        ground("", "", [], 0, 10)


# --- choosing the beam's report that agrees with the boxes ---------------------------------


def test_consistency_counts_denied_unreported_boxes_and_ungrounded_sentences() -> None:
    boxes = [("Pleural effusion", LEFT_LOWER), ("Pneumothorax", RIGHT_UPPER)]
    text = "No pleural effusion. Right upper pneumothorax. Left upper nodule."
    # the effusion is denied (and so unreported); the nodule sentence has no box
    assert consistency(text, boxes, SIZE, SIZE) == (1, 1, 1)
    assert consistency("Left pleural effusion. Right pneumothorax.", boxes, SIZE, SIZE) == (0, 0, 0)


def test_most_consistent_passes_over_a_more_probable_report_that_denies_a_box() -> None:
    boxes = [("Pleural effusion", LEFT_LOWER)]
    beam = [
        ("The lungs are clear. No pleural effusion or pneumothorax.", "No acute disease."),
        ("Small left pleural effusion. No pneumothorax.", "Left pleural effusion."),
    ]
    assert most_consistent(beam, boxes, SIZE, SIZE) == 1


def test_most_consistent_prefers_the_box_side_and_zone() -> None:
    boxes = [("Pneumothorax", RIGHT_UPPER)]
    beam = [("Left pneumothorax.", ""), ("Right apical pneumothorax.", "")]
    assert most_consistent(beam, boxes, SIZE, SIZE) == 1


def test_most_consistent_prefers_a_denial_free_omission_to_a_denial() -> None:
    boxes = [("Nodule/Mass", RIGHT_UPPER)]
    beam = [("No nodule or mass.", ""), ("The heart size is normal.", "")]
    assert most_consistent(beam, boxes, SIZE, SIZE) == 1


def test_most_consistent_prefers_fewer_findings_without_a_box() -> None:
    boxes = [("Pleural effusion", LEFT_LOWER)]
    beam = [
        ("Left pleural effusion. Right upper nodule.", ""),
        ("Left pleural effusion. No pneumothorax.", ""),
    ]
    assert most_consistent(beam, boxes, SIZE, SIZE) == 1


def test_most_consistent_keeps_the_most_probable_of_equally_consistent_reports() -> None:
    boxes = [("Cardiomegaly", HEART)]
    beam = [("The heart is enlarged.", "Cardiomegaly."), ("Cardiomegaly.", "Cardiomegaly.")]
    assert most_consistent(beam, boxes, SIZE, SIZE) == 0
    assert most_consistent(beam[:1], [], SIZE, SIZE) == 0
    with pytest.raises(ValueError, match="no candidate"):
        most_consistent([], boxes, SIZE, SIZE)


def test_report_chooser_names() -> None:
    assert report_chooser("consistent") is most_consistent
    assert report_chooser("probable") is None
    with pytest.raises(ValueError, match="consistent, probable"):
        report_chooser("longest")
