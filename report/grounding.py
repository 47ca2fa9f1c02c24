"""Grounded findings: tie each lesion box to the findings sentence that states it (pure).

:func:`ground` splits the generated findings and impression into sentences, reads from each
sentence the observations it states (mapped to the 22 VinDr-CXR classes of
:data:`report.codes.VINDR_CLASSES`) with their negation, laterality and lung zone, and matches
every detected box to a findings sentence by class, side and zone. It needs no model: the rules
are a small, documented phrase table (docs/model.md, "Grounded findings").

Rules
-----
- A box is *reported* when a positive findings sentence states its class on a compatible side
  and zone and no findings sentence denies it there; it is tied to the first such sentence.
  Every other box is not presented as a finding of the report: *negated* (the text denies its
  class there), *contradicted* (the text both states and denies it), *mislocated* (the class is
  stated, but on the other side or in another zone) or *omitted* (the text does not mention it).
- A positive findings sentence whose observation has no box is *ungrounded*
  (``localised and not grounded``).
- An impression sentence is kept only when the findings support it: each positive observation
  stated positively (and not also denied) in the findings on a compatible side and zone, no
  negated observation stated
  positively in the findings, and a global normal statement ("No acute cardiopulmonary
  process.") only when the findings state no positive observation. An impression sentence
  without a recognised observation is kept.

Sides are the patient's. Boxes are read in the frame the model reads, the way chest radiographs
are displayed: the patient's right on the image's left (a box centre left of the vertical
midline is on the patient's right). Zones are thirds of the lung height approximated by bands
of the image height (box centre): upper below 0.42, middle 0.26 to 0.60, lower above 0.42; the
bands overlap so that a box near a border matches either zone.

Examples
--------
>>> g = ground("Small left pleural effusion. No pneumothorax.", "Left pleural effusion.",
...            [("Pleural effusion", (700.0, 600.0, 900.0, 800.0)),
...             ("Pneumothorax", (100.0, 100.0, 300.0, 400.0))], 1024, 1024)
>>> [lesion.status for lesion in g.lesions]
['reported', 'negated']
>>> g.sentences[0].lesions, g.sentences[0].grounded
((0,), True)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from d2r_core.geometry import Box

__all__ = [
    "GLOBAL_NORMAL",
    "REPORT_CHOICES",
    "MIDLINE_CLASSES",
    "Grounding",
    "LesionGrounding",
    "Mention",
    "Sentence",
    "box_side",
    "box_zone_compatible",
    "consistency",
    "ground",
    "most_consistent",
    "mentions",
    "report_chooser",
    "split_sentences",
]


RIGHT: Final = "right"
LEFT: Final = "left"
BILATERAL: Final = "bilateral"
UPPER: Final = "upper"
MIDDLE: Final = "middle"
LOWER: Final = "lower"
#: Pseudo-class of a global normal statement ("No acute cardiopulmonary process.").
GLOBAL_NORMAL: Final = "(no acute abnormality)"

#: Classes on the midline or of the whole chest: their side and zone are not checked.
MIDLINE_CLASSES: Final = frozenset(
    {"Aortic enlargement", "Cardiomegaly", "Enlarged PA", "Mediastinal shift"}
)
#: Classes a sentence saying the lungs are clear denies.
_LUNG_PARENCHYMA: Final = (
    "Atelectasis",
    "Consolidation",
    "Edema",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Lung cavity",
    "Lung cyst",
    "Nodule/Mass",
    "Pulmonary fibrosis",
)

# Observation phrases, most specific first; a matched span is consumed, so "cavitary lesion"
# is a Lung cavity and not also an Other lesion, "interstitial pulmonary edema" is Edema, not ILD.
_OBSERVATIONS: Final[tuple[tuple[str, str], ...]] = (
    ("Lung cavity", r"cavit(?:y|ies|ary)(?: lesions?)?"),
    ("Calcification", r"calcif\w*(?: granulomas?)?|granulomas?"),
    ("Pleural thickening", r"pleural thickening|thickening of the pleura"),
    ("Pleural effusion", r"(?<!pericardial )(?:pleural )?effusions?|hydrothorax"),
    ("Pneumothorax", r"pneumothora(?:x|ces)"),
    (
        "Rib fracture",
        r"rib fractures?|fractured ribs?|fractures? of the (?:[\w-]+ ){0,3}ribs?",
    ),
    (
        "Clavicle fracture",
        r"clavic\w* fractures?|fractures? of the (?:[\w-]+ ){0,2}clavicles?",
    ),
    (
        "Cardiomegaly",
        r"cardiomegaly|enlarged (?:heart|cardiac silhouette)|"
        r"(?:heart|cardiac silhouette)(?: size)? (?:is |appears |remains )?"
        r"(?:mildly |moderately |severely )?enlarged",
    ),
    (
        "Aortic enlargement",
        r"(?:enlarged|widened|dilated|ectatic|prominent|tortuous) aort\w*(?: knob| arch)?|"
        r"aort\w*(?: knob| arch| contour)? (?:is |are )?"
        r"(?:enlarged|widened|dilated|ectatic|prominent|tortuous)",
    ),
    (
        "Enlarged PA",
        r"(?:enlarged|prominent|dilated) pulmonary arter\w*|"
        r"pulmonary arter\w* (?:is |are )?(?:enlarged|prominent|dilated)",
    ),
    ("Mediastinal shift", r"mediastinal shift|shift of the mediastinum|mediastinum is shifted"),
    ("Edema", r"(?:(?:pulmonary|interstitial|alveolar) )*o?edema"),
    (
        "ILD",
        r"interstitial lung disease|\bild\b|reticular (?:opacities|pattern|markings)|"
        r"interstitial (?:opacities|markings|thickening)",
    ),
    ("Pulmonary fibrosis", r"fibros\w*|fibrotic"),
    ("Emphysema", r"emphysema\w*|hyperinflat\w*|hyperexpan\w*"),
    ("Consolidation", r"consolidat\w*|pneumonia|airspace disease"),
    ("Atelectasis", r"atelecta\w*"),
    ("Nodule/Mass", r"\bnodul\w*|\bmass(?:es)?\b"),
    ("Lung cyst", r"\bcysts?\b|\bcystic\b"),
    ("Infiltration", r"infiltrat\w*"),
    ("Lung Opacity", r"opacit(?:y|ies)|opacification|ground[- ]glass|haziness"),
    ("Other lesion", r"\blesions?\b"),
)
_OBSERVATION_PATTERNS: Final = tuple((c, re.compile(p)) for c, p in _OBSERVATIONS)

# Normal statements that deny classes without naming them.
_NORMALS: Final[tuple[tuple[tuple[str, ...], re.Pattern[str]], ...]] = (
    (
        ("Cardiomegaly",),
        re.compile(
            r"\b(?:heart|cardiac silhouette|cardiac size|heart size)\b[^.;]*?"
            r"\b(?:normal|within normal limits|unremarkable|not enlarged)\b"
        ),
    ),
    (
        ("Aortic enlargement", "Mediastinal shift"),
        re.compile(
            r"\bmediastin\w* (?:contours?|silhouettes?) (?:is |are )?(?:normal|unremarkable)"
        ),
    ),
    (_LUNG_PARENCHYMA, re.compile(r"\blungs? (?:are|is) (?:well expanded and )?clear\b")),
    (("Rib fracture", "Clavicle fracture"), re.compile(r"\bno acute osseous abnormalit")),
    (
        (GLOBAL_NORMAL,),
        re.compile(
            r"\bno acute (?:cardiopulmonary|cardiothoracic|intrathoracic) "
            r"(?:process|abnormality|disease|findings?)\b|\bnormal chest (?:radiograph|x-ray)\b"
        ),
    ),
)
_NEGATION: Final = re.compile(r"\b(?:no|not|without|negative for|free of|nor|resolved)\b")
# a comma ends a negation's scope when the next part states something (a list goes on)
_POSITIVE_CUE: Final = re.compile(
    r"\b(?:there (?:is|are)|with|mild|moderate|small|large|new|present|seen|noted|severe)\b"
)
_SIDES: Final = re.compile(r"\b(right|left|bilateral(?:ly)?|both|bibasilar|bibasal)\b")
_ZONES: Final = re.compile(
    r"\b(upper|apical|apex|apices|mid|middle|perihilar|lower|basal|base|bases|basilar|bibasilar|bibasal)\b"
)
_ZONE_OF: Final = {
    "upper": UPPER,
    "apical": UPPER,
    "apex": UPPER,
    "apices": UPPER,
    "mid": MIDDLE,
    "middle": MIDDLE,
    "perihilar": MIDDLE,
    "lower": LOWER,
    "basal": LOWER,
    "base": LOWER,
    "bases": LOWER,
    "basilar": LOWER,
    "bibasilar": LOWER,
    "bibasal": LOWER,
}
#: Bands of the image height (box centre) compatible with each zone; they overlap.
ZONE_BANDS: Final = {UPPER: (0.0, 0.42), MIDDLE: (0.26, 0.60), LOWER: (0.42, 1.0)}
#: Half width (fraction of the image width) of the band around the midline with no side.
MIDLINE_BAND: Final = 0.03


@dataclass(frozen=True)
class Mention:
    """One observation a sentence states (or denies).

    Parameters
    ----------
    class_name : str
        A VinDr-CXR class, or :data:`GLOBAL_NORMAL`.
    negated : bool
        The sentence denies the observation.
    laterality : str or None
        ``"right"``, ``"left"``, ``"bilateral"`` (patient's side) or None (not said).
    zone : str or None
        ``"upper"``, ``"middle"``, ``"lower"`` or None (not said).
    """

    class_name: str
    negated: bool
    laterality: str | None = None
    zone: str | None = None


@dataclass(frozen=True)
class Sentence:
    """One sentence of the findings or the impression and what grounding made of it.

    ``lesions`` are the indices of the boxes tied to it (findings only). ``supported`` is
    False for an impression sentence the findings contradict or omit (it is dropped).
    """

    text: str
    section: str  # "findings" or "impression"
    mentions: tuple[Mention, ...]
    lesions: tuple[int, ...] = ()
    supported: bool = True

    @property
    def positive(self) -> tuple[Mention, ...]:
        """The observations the sentence states (not denied, not global normal)."""
        return tuple(m for m in self.mentions if not m.negated and m.class_name != GLOBAL_NORMAL)

    @property
    def localised(self) -> bool:
        """A findings sentence stating a box-level observation (so it should have a box)."""
        return self.section == "findings" and bool(self.positive)

    @property
    def grounded(self) -> bool:
        """A localised sentence with at least one box."""
        return self.localised and bool(self.lesions)


@dataclass(frozen=True)
class LesionGrounding:
    """What grounding made of one box.

    ``status`` is ``"reported"`` (tied to findings sentence ``sentence``), ``"negated"``,
    ``"contradicted"`` (the findings both state and deny it), ``"mislocated"`` or
    ``"omitted"``; only reported boxes are findings of the report.
    """

    class_name: str
    status: str
    sentence: int | None
    side: str | None
    span: tuple[float, float]  # top and bottom of the box, fractions of the image height

    @property
    def reported(self) -> bool:
        return self.status == "reported"


@dataclass(frozen=True)
class Grounding:
    """Sentences (findings first, then impression) and the grounding of every box."""

    sentences: tuple[Sentence, ...]
    lesions: tuple[LesionGrounding, ...]

    @property
    def findings(self) -> tuple[Sentence, ...]:
        return tuple(s for s in self.sentences if s.section == "findings")

    @property
    def impression(self) -> str:
        """The impression with the sentences the findings do not support left out."""
        return " ".join(s.text for s in self.sentences if s.section == "impression" and s.supported)

    @property
    def dropped_impression(self) -> tuple[str, ...]:
        """Impression sentences left out: the findings contradict or omit them."""
        return tuple(
            s.text for s in self.sentences if s.section == "impression" and not s.supported
        )

    @property
    def reported(self) -> tuple[int, ...]:
        """Indices of the boxes that are findings of the report."""
        return tuple(i for i, g in enumerate(self.lesions) if g.reported)

    def sentence_of(self, lesion: int) -> str | None:
        """The text of the findings sentence box ``lesion`` is tied to (None: not reported)."""
        index = self.lesions[lesion].sentence
        return None if index is None else self.sentences[index].text


# --- text ----------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """Split report text into sentences at ``.``, ``!`` or ``?`` followed by a space.

    >>> split_sentences("A 2.3 cm nodule. No effusion!  Heart normal")
    ['A 2.3 cm nodule.', 'No effusion!', 'Heart normal']
    """
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return [p.strip() for p in parts if p.strip()]


def _clauses(sentence: str) -> list[tuple[int, int]]:
    """Spans of the clauses that bound a negation's scope."""
    bounds = [0]
    for m in re.finditer(r";|\bbut\b|\bhowever\b|,", sentence):
        following = sentence[m.end() :].split(",")[0]
        if m.group() == "," and not (
            _POSITIVE_CUE.search(following) or _NEGATION.match(following.strip())
        ):
            continue  # a list goes on: "no effusion, pneumothorax or consolidation"
        bounds.append(m.end())
    bounds.append(len(sentence))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _chunks(sentence: str) -> list[tuple[int, int]]:
    """Spans of the phrases whose side and zone words belong to one observation."""
    bounds = [0]
    for m in re.finditer(r";|,|\band\b|\bwith\b|\bbut\b", sentence):
        bounds.append(m.end())
    bounds.append(len(sentence))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _side(words: list[str]) -> str | None:
    sides = {
        BILATERAL if w not in (RIGHT, LEFT) else w for w in words
    }  # "both", "bibasilar", ... are bilateral
    if BILATERAL in sides or sides == {RIGHT, LEFT}:
        return BILATERAL
    return next(iter(sides)) if sides else None


def _zone(words: list[str]) -> str | None:
    zones = {_ZONE_OF[w] for w in words}
    return next(iter(zones)) if len(zones) == 1 else None


def _within(spans: list[tuple[int, int]], at: int) -> tuple[int, int]:
    return next(((a, b) for a, b in spans if a <= at < b), spans[-1])


def mentions(sentence: str) -> tuple[Mention, ...]:
    """The observations a sentence states or denies, one per class (positive wins).

    >>> mentions("Moderate left pleural effusion; no pneumothorax.")
    (Mention(class_name='Pleural effusion', negated=False, laterality='left', zone=None), \
Mention(class_name='Pneumothorax', negated=True, laterality=None, zone=None))
    >>> mentions("Right lower lung pneumonia with consolidation.")
    (Mention(class_name='Consolidation', negated=False, laterality='right', zone='lower'),)
    """
    text = sentence.lower()
    found: list[tuple[int, Mention]] = []
    clauses, chunks = _clauses(text), _chunks(text)
    masked = text
    for class_name, pattern in _OBSERVATION_PATTERNS:
        for m in pattern.finditer(masked):
            start = m.start()
            c0, c1 = _within(clauses, start)
            negated = bool(_NEGATION.search(text[c0:start]))
            k0, k1 = _within(chunks, start)
            side = _side([w.group(1) for w in _SIDES.finditer(text[k0:k1])])
            if side is None:  # the clause's side: "right lower lung pneumonia with consolidation"
                side = _side([w.group(1) for w in _SIDES.finditer(text[c0:c1])])
            zone = _zone([w.group(1) for w in _ZONES.finditer(text[k0:k1])])
            if zone is None:
                zone = _zone([w.group(1) for w in _ZONES.finditer(text[c0:c1])])
            found.append((start, Mention(class_name, negated, side, zone)))
        masked = pattern.sub(lambda m: " " * len(m.group()), masked)
    for classes, pattern in _NORMALS:
        normal = pattern.search(text)
        if normal is not None:
            found += [(normal.start(), Mention(c, True)) for c in classes]
    merged: dict[str, Mention] = {}
    for _, mention in sorted(found, key=lambda item: item[0]):
        kept = merged.get(mention.class_name)
        if kept is None or (kept.negated and not mention.negated):
            merged[mention.class_name] = mention
        elif not kept.negated and not mention.negated:
            merged[mention.class_name] = Mention(
                kept.class_name,
                False,
                kept.laterality or mention.laterality,
                kept.zone or mention.zone,
            )
    return tuple(merged.values())


# --- geometry ------------------------------------------------------------------------------


def box_side(box: Box, columns: int) -> str | None:
    """The patient's side of a box: its centre left of the image midline is the patient's
    right (None within :data:`MIDLINE_BAND` of the midline).

    >>> box_side((10.0, 0.0, 30.0, 10.0), 100), box_side((60.0, 0.0, 90.0, 10.0), 100)
    ('right', 'left')
    """
    centre = (box[0] + box[2]) / 2.0 / float(columns)
    if abs(centre - 0.5) < MIDLINE_BAND:
        return None
    return RIGHT if centre < 0.5 else LEFT


def _span(box: Box, rows: int) -> tuple[float, float]:
    return box[1] / float(rows), box[3] / float(rows)


def box_zone_compatible(zone: str | None, span: tuple[float, float]) -> bool:
    """Whether a box whose rows span ``span`` (fractions of the height) reaches ``zone``.

    >>> box_zone_compatible("upper", (0.15, 0.45)), box_zone_compatible("lower", (0.15, 0.40))
    (True, False)
    """
    if zone is None:
        return True
    low, high = ZONE_BANDS[zone]
    return span[0] <= high and span[1] >= low


def _side_compatible(said: str | None, side: str | None) -> bool:
    return said is None or side is None or said in (BILATERAL, side)


def _fits(mention: Mention, class_name: str, side: str | None, span: tuple[float, float]) -> bool:
    if mention.class_name != class_name:
        return False
    if class_name in MIDLINE_CLASSES:
        return True
    return _side_compatible(mention.laterality, side) and box_zone_compatible(mention.zone, span)


def _mentions_agree(a: Mention, b: Mention) -> bool:
    """Two positive mentions of one class that can describe the same finding."""
    if a.class_name != b.class_name:
        return False
    if a.class_name in MIDLINE_CLASSES:
        return True
    sides_ok = (
        a.laterality is None
        or b.laterality is None
        or BILATERAL
        in (
            a.laterality,
            b.laterality,
        )
        or a.laterality == b.laterality
    )
    zones_ok = a.zone is None or b.zone is None or a.zone == b.zone
    return sides_ok and zones_ok


def _impression_supported(sentence: tuple[Mention, ...], findings: list[Mention]) -> bool:
    positive_findings = [m for m in findings if not m.negated and m.class_name != GLOBAL_NORMAL]
    for mention in sentence:
        if mention.class_name == GLOBAL_NORMAL:
            if positive_findings:
                return False
        elif mention.negated:
            if any(_mentions_agree(mention, f) for f in positive_findings):
                return False
        elif not any(_mentions_agree(mention, f) for f in positive_findings) or any(
            _mentions_agree(mention, Mention(f.class_name, False, f.laterality, f.zone))
            for f in findings
            if f.negated and f.class_name != GLOBAL_NORMAL
        ):
            return False  # omitted by the findings, or denied there too
    return True


# --- grounding -----------------------------------------------------------------------------


def ground(
    findings: str,
    impression: str,
    boxes: Sequence[tuple[str, Box]],
    columns: int,
    rows: int,
) -> Grounding:
    """Ground ``boxes`` (class name, ``(x_min, y_min, x_max, y_max)`` in image pixels of an
    image ``columns`` wide and ``rows`` high) in the findings; check the impression.

    Returns
    -------
    Grounding
        Sentences (findings, then impression) with their boxes, and one
        :class:`LesionGrounding` per box, in the order given.
    """
    if columns <= 0 or rows <= 0:
        raise ValueError(f"columns and rows must be positive, got {columns}x{rows}")
    found = [Sentence(t, "findings", mentions(t)) for t in split_sentences(findings)]
    linked: list[list[int]] = [[] for _ in found]
    result: list[LesionGrounding] = []
    for index, (class_name, box) in enumerate(boxes):
        side = box_side(box, columns)
        span = _span(box, rows)
        stated = [m for s in found for m in s.mentions if m.class_name == class_name]
        denied = any(m.negated and _fits(m, class_name, side, span) for m in stated)
        status, tied = "omitted", None
        for number, sentence in enumerate(found):
            if any(_fits(m, class_name, side, span) for m in sentence.positive):
                if (
                    denied
                ):  # "Right pneumothorax. ... No pneumothorax.": the text contradicts itself
                    status = "contradicted"
                else:
                    status, tied = "reported", number
                    linked[number].append(index)
                break
        if status == "omitted":
            if denied:
                status = "negated"
            elif any(not m.negated for m in stated):
                status = "mislocated"
        result.append(LesionGrounding(class_name, status, tied, side, span))
    sentences = [
        Sentence(s.text, s.section, s.mentions, tuple(linked[n])) for n, s in enumerate(found)
    ]
    all_findings = [m for s in found for m in s.mentions]
    for text in split_sentences(impression):
        said = mentions(text)
        sentences.append(
            Sentence(text, "impression", said, (), _impression_supported(said, all_findings))
        )
    return Grounding(tuple(sentences), tuple(result))


# --- choosing among the generator's hypotheses ---------------------------------------------


def consistency(
    findings: str, boxes: Sequence[tuple[str, Box]], columns: int, rows: int
) -> tuple[int, int, int]:
    """How far a findings text disagrees with the detected ``boxes``; smaller is better.

    ``(boxes the text denies, boxes the text does not report, positive findings sentences with
    no box)``: the boxes :func:`ground` makes ``negated`` or ``contradicted``, those it does
    not make ``reported``, and its ungrounded sentences.

    >>> box = [("Pleural effusion", (700.0, 600.0, 900.0, 800.0))]
    >>> consistency("No pleural effusion.", box, 1024, 1024)
    (1, 1, 0)
    >>> consistency("Small left pleural effusion.", box, 1024, 1024)
    (0, 0, 0)
    """
    g = ground(findings, "", boxes, columns, rows)
    denied = sum(lesion.status in ("negated", "contradicted") for lesion in g.lesions)
    unreported = sum(not lesion.reported for lesion in g.lesions)
    ungrounded = sum(s.localised and not s.grounded for s in g.findings)
    return denied, unreported, ungrounded


def most_consistent(
    candidates: Sequence[tuple[str, str]],
    boxes: Sequence[tuple[str, Box]],
    columns: int,
    rows: int,
) -> int:
    """The index of the candidate report (findings, impression) whose findings agree best with
    the detected ``boxes`` (:func:`consistency`, compared in that order); ties go to the
    earlier candidate, so with candidates given most probable first the most probable of the
    equally consistent ones is chosen. Only the findings are read: grounding ties boxes to
    findings sentences, and the impression is checked against the findings afterwards.

    >>> box = [("Pneumothorax", (100.0, 100.0, 300.0, 400.0))]
    >>> most_consistent([("No pneumothorax.", ""), ("Right pneumothorax.", "")], box, 1024, 1024)
    1
    """
    if not candidates:
        raise ValueError("no candidate reports to choose from")
    keys = [consistency(findings, boxes, columns, rows) for findings, _ in candidates]
    return min(range(len(candidates)), key=lambda i: (keys[i], i))


#: ``D2R_REPORT_CHOICE`` values: ``consistent`` (:func:`most_consistent` over the beam) or
#: ``probable`` (the beam's most probable report)
REPORT_CHOICES: Final = ("consistent", "probable")


def report_chooser(
    choice: str,
) -> Callable[[Sequence[tuple[str, str]], Sequence[tuple[str, Box]], int, int], int] | None:
    """The chooser for a :data:`REPORT_CHOICES` value (None: the most probable report).

    >>> report_chooser("consistent") is most_consistent, report_chooser("probable")
    (True, None)
    """
    if choice not in REPORT_CHOICES:
        raise ValueError(f"expected one of {', '.join(REPORT_CHOICES)}, got {choice!r}")
    return most_consistent if choice == "consistent" else None
