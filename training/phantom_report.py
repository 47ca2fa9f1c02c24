"""Templated reference reports for phantom studies (pure).

Every drawn lesion is stated positively, with its laterality ("right" = the patient's right,
the image's left) and zone; classes that are not drawn are either not mentioned or negated
("No pleural effusion."). Uncertainty appears only about an interpretation that is not itself a
drawn class ("consolidation, concerning for pneumonia"), so the drawn findings stay
unambiguous. Normal studies get normal reports. Phrasing varies with the study's random stream.

Synthetic data, not for clinical use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.phantom import Lesion, PhantomStudy

_SIDE = {"R": "right", "L": "left"}

_HEART_NORMAL = (
    "The heart size is normal.",
    "Heart size is within normal limits.",
    "The cardiac silhouette is normal in size.",
)
_HEART_ENLARGED = (
    "The heart is enlarged.",
    "Cardiomegaly is present.",
    "The cardiac silhouette is enlarged.",
    "There is moderate cardiomegaly.",
)
_MEDIASTINUM_NORMAL = (
    "The mediastinal contour is normal.",
    "The mediastinal silhouette is unremarkable.",
    "",
)
_AORTA = (
    "The aortic contour is enlarged.",
    "Widened mediastinal contour from an enlarged aortic knob.",
    "The aortic knob is enlarged, widening the mediastinal contour.",
)
_LUNGS_CLEAR = (
    "The lungs are clear.",
    "Lungs are clear.",
    "The lungs are well expanded and clear.",
)
_NO_CONSOLIDATION = ("No focal consolidation.", "There is no focal consolidation.")
_BONES_NORMAL = ("No acute osseous abnormality.", "No displaced rib fracture.", "")
_IMPRESSION_NORMAL = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "Normal chest radiograph.",
)


@dataclass(frozen=True)
class PhantomReport:
    """Findings and impression of one phantom study."""

    findings: str
    impression: str

    @property
    def text(self) -> str:
        """``FINDINGS: ... IMPRESSION: ...`` as one string."""
        return f"FINDINGS: {self.findings} IMPRESSION: {self.impression}"


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _where(le: Lesion) -> str:
    return f"{_SIDE[le.laterality]} {le.attr('zone')} lung"


def _finding(le: Lesion, rng: np.random.Generator) -> tuple[str, str]:
    """(findings sentence, impression phrase) for one drawn lesion."""
    side = _SIDE.get(le.laterality, "")
    name = le.class_name
    if name == "Nodule/Mass":
        kind = le.attr("kind")
        sent = _pick(
            rng,
            (
                f"A {le.attr('cm')} cm {kind} in the {_where(le)}.",
                f"There is a {kind} in the {_where(le)} measuring {le.attr('cm')} cm.",
            ),
        )
        return sent, f"{side.capitalize()} {le.attr('zone')} lung {kind}."
    if name == "Consolidation":
        tail = {
            "concerning": ", concerning for pneumonia",
            "compatible": ", compatible with pneumonia",
        }.get(le.attr("pneumonia"), "")
        sent = _pick(
            rng,
            (
                f"Consolidation in the {_where(le)}{tail}.",
                f"There is consolidation in the {_where(le)}{tail}.",
            ),
        )
        return sent, f"{side.capitalize()} {le.attr('zone')} lung consolidation{tail}."
    if name == "Atelectasis":
        sent = _pick(
            rng,
            (
                f"Discoid atelectasis in the {_where(le)}.",
                f"Linear atelectasis in the {_where(le)}.",
            ),
        )
        return sent, f"{side.capitalize()} {le.attr('zone')} lung atelectasis."
    if name == "Lung cavity":
        sent = _pick(
            rng,
            (
                f"A thick-walled cavitary lesion in the {_where(le)}.",
                f"Cavitary lesion in the {_where(le)}.",
            ),
        )
        return sent, f"Cavitary lesion in the {_where(le)}."
    if name == "Calcification":
        sent = _pick(
            rng,
            (
                f"Calcified granuloma in the {_where(le)}.",
                f"Punctate calcifications in the {_where(le)}.",
            ),
        )
        return sent, f"Calcified granuloma in the {_where(le)}."
    if name == "Pleural effusion":
        size = le.attr("size")
        sent = _pick(
            rng,
            (
                f"{size.capitalize()} {side} pleural effusion with blunting of the "
                f"{side} costophrenic angle.",
                f"There is a {size} {side} pleural effusion.",
            ),
        )
        return sent, f"{size.capitalize()} {side} pleural effusion."
    if name == "Pneumothorax":
        size = le.attr("size")
        sent = _pick(
            rng,
            (
                f"There is a {size} {side} apical pneumothorax.",
                f"{size.capitalize()} {side} pneumothorax with a visible pleural line.",
            ),
        )
        return sent, f"{size.capitalize()} {side} pneumothorax."
    if name == "Pleural thickening":
        sent = _pick(
            rng,
            (
                f"Pleural thickening along the {side} lateral chest wall.",
                f"There is {side} lateral pleural thickening.",
            ),
        )
        return sent, f"{side.capitalize()} pleural thickening."
    if name == "Rib fracture":
        sent = _pick(
            rng,
            (
                f"Fracture of the {side} {le.attr('rib')} rib.",
                f"There is a displaced fracture of the {side} {le.attr('rib')} rib.",
            ),
        )
        return sent, f"{side.capitalize()} {le.attr('rib')} rib fracture."
    raise ValueError(f"class_name: no report template for {name!r}")


def write_report(study: PhantomStudy) -> PhantomReport:
    """Return the reference report of ``study`` (deterministic from the study's seed)."""
    rng = np.random.default_rng([study.seed, study.index, 7])
    by_class = {le.class_name: le for le in study.lesions}
    present = set(by_class)
    impression: list[str] = []
    sentences: list[str] = []

    def add(le: Lesion) -> None:
        sent, imp = _finding(le, rng)
        sentences.append(sent)
        impression.append(imp)

    if "Cardiomegaly" in present:
        sentences.append(_pick(rng, _HEART_ENLARGED))
        impression.append("Cardiomegaly.")
    else:
        sentences.append(_pick(rng, _HEART_NORMAL))
    if "Aortic enlargement" in present:
        sentences.append(_pick(rng, _AORTA))
        impression.append("Enlarged aortic contour.")
    else:
        sentences.append(_pick(rng, _MEDIASTINUM_NORMAL))
    lung_classes = ("Consolidation", "Nodule/Mass", "Lung cavity", "Atelectasis", "Calcification")
    lung_lesions = [by_class[c] for c in lung_classes if c in present]
    for le in lung_lesions:
        add(le)
    if not lung_lesions:
        sentences.append(_pick(rng, _LUNGS_CLEAR))
    elif "Consolidation" not in present and rng.random() < 0.5:
        sentences.append(_pick(rng, _NO_CONSOLIDATION))
    negated = []
    for cls, word in (("Pleural effusion", "pleural effusion"), ("Pneumothorax", "pneumothorax")):
        if cls in present:
            add(by_class[cls])
        else:
            negated.append(word)
    if "Pleural thickening" in present:
        add(by_class["Pleural thickening"])
    if negated:
        sentences.append("No " + " or ".join(negated) + ".")
    if "Rib fracture" in present:
        add(by_class["Rib fracture"])
    else:
        sentences.append(_pick(rng, _BONES_NORMAL))
    findings = " ".join(s for s in sentences if s)
    impression_text = " ".join(impression) if impression else _pick(rng, _IMPRESSION_NORMAL)
    return PhantomReport(findings=findings, impression=impression_text)


__all__ = ["PhantomReport", "write_report"]
