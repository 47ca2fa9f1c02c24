"""Templated reference reports for phantom studies (pure).

Every drawn lesion is stated positively, with its laterality ("right" = the patient's right,
the image's left) and zone; classes that are not drawn are either not mentioned or negated
("No pleural effusion."). Uncertainty appears only about an interpretation that is not itself a
drawn class ("consolidation, concerning for pneumonia"), so the drawn findings stay
unambiguous; a subset of consolidations is reported as pneumonia outright ("Right lower lung
pneumonia with consolidation."). Support devices (an endotracheal tube, a right internal jugular
catheter) are described first in the findings and left out of the impression. Normal studies get
normal reports. Phrasing varies with the study's random stream.

With the drawn classes and devices the reports cover all 14 CheXpert observations of the
rule-based labeler (:mod:`training.evaluation.labeler`); calcified granulomas map to none.

Length: a report is kept within :data:`TOKEN_BUDGET` tokens of ``Tokenizer.encode`` (findings,
impression and the ``<bos>``/``<sep>``/``<eos>`` ids; R2Gen cleaning) because the report decoder
generates at most 60. When the full wording is longer, optional normal sentences are dropped
first (bones, "no focal consolidation", mediastinum, heart size, negated pleural findings), then
findings and impression phrases switch to their compact forms, and last the impression keeps only
its leading phrases. The findings state every drawn finding at every step, with the same labels.

Synthetic data, not for clinical use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from model.tokenizer import tokenize
from training.phantom import Device, Lesion, PhantomStudy

#: Most ``Tokenizer.encode`` ids (with ``<bos>``, ``<sep>``, ``<eos>``) of a reference report.
TOKEN_BUDGET = 55

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
#: Optional (normal) sentences in the order they are dropped from a report that is too long.
_DROP_ORDER = ("bones", "no-consolidation", "mediastinum", "heart", "pleura", "lungs")


@dataclass(frozen=True)
class PhantomReport:
    """Findings and impression of one phantom study.

    ``sentences`` are the findings sentences in order, each with the indices (into the study's
    ``lesions``) of the lesions it states: the true boxes of every finding sentence (bilateral
    edema: one sentence, two lesions; a normal or device sentence: none).
    """

    findings: str
    impression: str
    sentences: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def text(self) -> str:
        """``FINDINGS: ... IMPRESSION: ...`` as one string."""
        return f"FINDINGS: {self.findings} IMPRESSION: {self.impression}"


@dataclass(frozen=True)
class _Part:
    """One findings sentence (full and compact) and its impression phrase (or none)."""

    sentence: str
    short: str = ""  # compact sentence; "" = the same as ``sentence``
    impression: str = ""
    impression_short: str = ""  # "" = the same as ``impression``
    optional: str = ""  # a _DROP_ORDER key for a normal sentence that may be dropped
    lesions: tuple[int, ...] = ()  # indices of the study's lesions the sentence states

    def text(self, compact: bool) -> str:
        return (self.short or self.sentence) if compact else self.sentence

    def summary(self, compact: bool) -> str:
        return (self.impression_short or self.impression) if compact else self.impression


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _where(le: Lesion) -> str:
    return f"{_SIDE[le.laterality]} {le.attr('zone')} lung"


def _finding(le: Lesion, rng: np.random.Generator) -> _Part:
    """Findings sentence (full, compact) and impression phrase(s) for one drawn lesion."""
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
        short = f"A {le.attr('cm')} cm {kind} in the {_where(le)}."
        return _Part(sent, short, f"{side.capitalize()} {le.attr('zone')} lung {kind}.")
    if name == "Consolidation":
        zone = f"{side.capitalize()} {le.attr('zone')} lung"
        if le.attr("pneumonia") == "positive":
            sent = _pick(
                rng,
                (
                    f"Consolidation in the {_where(le)} due to pneumonia.",
                    f"{zone} pneumonia with consolidation.",
                ),
            )
            short = f"{zone} pneumonia with consolidation."
            return _Part(sent, short, f"{zone} pneumonia.")
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
        return _Part(
            sent,
            f"Consolidation in the {_where(le)}{tail}.",
            f"{zone} consolidation{tail}.",
            f"{zone} consolidation.",
        )
    if name == "Lung Opacity":
        sent = _pick(
            rng,
            (
                f"Hazy opacity in the {_where(le)}.",
                f"There is a patchy opacity in the {_where(le)}.",
                f"Ground-glass opacity in the {_where(le)}.",
            ),
        )
        short = f"Hazy opacity in the {_where(le)}."
        return _Part(sent, short, f"{side.capitalize()} {le.attr('zone')} lung opacity.")
    if name == "Edema":
        grade = le.attr("grade")
        sent = _pick(
            rng,
            (
                f"{grade.capitalize()} pulmonary edema.",
                "Interstitial pulmonary edema.",
                f"There is {grade} pulmonary edema.",
            ),
        )
        return _Part(sent, "Pulmonary edema.", f"{grade.capitalize()} pulmonary edema.", "Edema.")
    if name == "Atelectasis":
        sent = _pick(
            rng,
            (
                f"Discoid atelectasis in the {_where(le)}.",
                f"Linear atelectasis in the {_where(le)}.",
            ),
        )
        return _Part(sent, "", f"{side.capitalize()} {le.attr('zone')} lung atelectasis.")
    if name == "Lung cavity":
        sent = _pick(
            rng,
            (
                f"A thick-walled cavitary lesion in the {_where(le)}.",
                f"Cavitary lesion in the {_where(le)}.",
            ),
        )
        return _Part(
            sent,
            f"Cavitary lesion in the {_where(le)}.",
            f"Cavitary lesion in the {_where(le)}.",
            f"{side.capitalize()} cavitary lesion.",
        )
    if name == "Calcification":
        sent = _pick(
            rng,
            (
                f"Calcified granuloma in the {_where(le)}.",
                f"Punctate calcifications in the {_where(le)}.",
            ),
        )
        return _Part(
            sent,
            f"Calcified granuloma in the {_where(le)}.",
            f"Calcified granuloma in the {_where(le)}.",
            f"{side.capitalize()} calcified granuloma.",
        )
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
        short = f"{size.capitalize()} {side} pleural effusion."
        return _Part(sent, short, short, f"{side.capitalize()} pleural effusion.")
    if name == "Pneumothorax":
        size = le.attr("size")
        sent = _pick(
            rng,
            (
                f"There is a {size} {side} apical pneumothorax.",
                f"{size.capitalize()} {side} pneumothorax with a visible pleural line.",
            ),
        )
        short = f"{size.capitalize()} {side} pneumothorax."
        return _Part(sent, short, short, f"{side.capitalize()} pneumothorax.")
    if name == "Pleural thickening":
        sent = _pick(
            rng,
            (
                f"Pleural thickening along the {side} lateral chest wall.",
                f"There is {side} lateral pleural thickening.",
            ),
        )
        short = f"{side.capitalize()} pleural thickening."
        return _Part(sent, short, short)
    if name == "Rib fracture":
        sent = _pick(
            rng,
            (
                f"Fracture of the {side} {le.attr('rib')} rib.",
                f"There is a displaced fracture of the {side} {le.attr('rib')} rib.",
            ),
        )
        return _Part(
            sent,
            f"Fracture of the {side} {le.attr('rib')} rib.",
            f"{side.capitalize()} {le.attr('rib')} rib fracture.",
            f"{side.capitalize()} rib fracture.",
        )
    raise ValueError(f"class_name: no report template for {name!r}")


def _device(dev: Device, rng: np.random.Generator) -> _Part:
    """Findings sentence (full, compact) for one support device; devices have no impression."""
    if dev.kind == "Endotracheal tube":
        cm = dev.attr("cm")
        sent = _pick(
            rng,
            (
                f"Endotracheal tube terminates {cm} cm above the carina.",
                f"The endotracheal tube tip is {cm} cm above the carina.",
            ),
        )
        return _Part(sent, f"Endotracheal tube {cm} cm above the carina.")
    if dev.kind == "Central venous catheter":
        sent = _pick(
            rng,
            (
                "Right internal jugular central venous catheter with tip in the SVC.",
                "Right internal jugular central venous catheter terminates in the SVC.",
            ),
        )
        return _Part(sent, "Right internal jugular catheter tip in the SVC.")
    raise ValueError(f"kind: no report template for device {dev.kind!r}")


def _token_count(findings: str, impression: str) -> int:
    """Ids of ``Tokenizer.encode(findings, impression)``: words plus bos, sep and eos."""
    return len(tokenize(findings)) + len(tokenize(impression)) + 3


def write_report(study: PhantomStudy) -> PhantomReport:
    """Return the reference report of ``study`` (deterministic from the study's seed)."""
    rng = np.random.default_rng([study.seed, study.index, 7])
    by_class = {le.class_name: le for le in study.lesions}
    present = set(by_class)

    def stating(part: _Part, cls: str) -> _Part:
        indices = tuple(i for i, le in enumerate(study.lesions) if le.class_name == cls)
        return replace(part, lesions=indices)

    parts: list[_Part] = [_device(dev, rng) for dev in study.devices]

    if "Cardiomegaly" in present:
        parts.append(
            stating(_Part(_pick(rng, _HEART_ENLARGED), "", "Cardiomegaly."), "Cardiomegaly")
        )
    else:
        parts.append(_Part(_pick(rng, _HEART_NORMAL), optional="heart"))
    if "Aortic enlargement" in present:
        aorta = _Part(_pick(rng, _AORTA), _AORTA[0], "Enlarged aortic contour.")
        parts.append(stating(aorta, "Aortic enlargement"))
    else:
        parts.append(_Part(_pick(rng, _MEDIASTINUM_NORMAL), optional="mediastinum"))
    lung_classes = (
        "Consolidation",
        "Lung Opacity",
        "Edema",
        "Nodule/Mass",
        "Lung cavity",
        "Atelectasis",
        "Calcification",
    )
    lung = [stating(_finding(by_class[c], rng), c) for c in lung_classes if c in present]
    parts.extend(lung)
    if not lung:
        parts.append(_Part(_pick(rng, _LUNGS_CLEAR), optional="lungs"))
    elif "Consolidation" not in present and rng.random() < 0.5:
        parts.append(_Part(_pick(rng, _NO_CONSOLIDATION), optional="no-consolidation"))
    negated = []
    for cls, word in (("Pleural effusion", "pleural effusion"), ("Pneumothorax", "pneumothorax")):
        if cls in present:
            parts.append(stating(_finding(by_class[cls], rng), cls))
        else:
            negated.append(word)
    if "Pleural thickening" in present:
        parts.append(stating(_finding(by_class["Pleural thickening"], rng), "Pleural thickening"))
    if negated:
        parts.append(_Part("No " + " or ".join(negated) + ".", optional="pleura"))
    if "Rib fracture" in present:
        parts.append(stating(_finding(by_class["Rib fracture"], rng), "Rib fracture"))
    else:
        parts.append(_Part(_pick(rng, _BONES_NORMAL), optional="bones"))
    normal_impression = _pick(rng, _IMPRESSION_NORMAL)

    def assemble(dropped: int, compact: bool, keep: int) -> tuple[str, str]:
        drop = set(_DROP_ORDER[:dropped])
        findings = " ".join(t for p in parts if p.optional not in drop and (t := p.text(compact)))
        summary = [s for p in parts if (s := p.summary(compact))][:keep]
        return findings, " ".join(summary) if summary else normal_impression

    def sentences(dropped: int, compact: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
        drop = set(_DROP_ORDER[:dropped])
        return tuple(
            (t, p.lesions) for p in parts if p.optional not in drop and (t := p.text(compact))
        )

    # full wording; then drop normal sentences one by one; then compact phrases; last, the
    # impression keeps only its leading phrases (the findings still state every finding)
    n = len(_DROP_ORDER)
    steps = [(k, False, len(parts)) for k in range(n + 1)]
    steps += [(n, True, keep) for keep in range(len(parts), 0, -1)]
    for dropped, compact, keep in steps:
        findings, impression = assemble(dropped, compact, keep)
        if _token_count(findings, impression) <= TOKEN_BUDGET:
            break
    return PhantomReport(findings, impression, sentences(dropped, compact))


__all__ = ["TOKEN_BUDGET", "PhantomReport", "write_report"]
