"""CheXpert-style labeler ("CE-rb"): 14 observations from report text, on medspaCy.

The pipeline is a blank English spaCy model (no model download) with spaCy's rule-based
sentencizer and three medspaCy components:

- ``medspacy_target_matcher``: the vendored CheXpert labeler mention phrase lists
  (``data/chexpert_phrases``, MIT) plus ``extra_mentions`` of ``data/labeler_rules.json``;
  mentions overlapping an unmention phrase (CheXpert's and ``extra_unmentions``) are dropped;
- ``medspacy_context`` (ConText) with radiology rules (``data/context_rules.json``): negated,
  possible, historical, hypothetical and family mentions;
- ``medspacy_sectionizer`` with report headers (``data/section_rules.json``): mentions in the
  indication, comparison and technique sections are not labelled.

Rules beyond ConText (``data/labeler_rules.json``):

- anatomy mentions of the heart and the cardiomediastinum ("heart size", "cardiac silhouette",
  "mediastinum", ...) are labelled by the size statement nearest to them in their clause:
  normal / within normal limits / not enlarged -> 0, enlarged / prominent / widened -> 1,
  none -> unmentioned;
- "stable" / "unchanged" never hedge a finding ("stable mild cardiomegaly" is positive), and
  "no change in ..." does not negate it;
- historical mentions of acute observations (pneumonia, edema, effusion, ...) are not labelled;
- per report: positive > uncertain > negative; a positive or uncertain "chf" / "heart failure"
  adds Cardiomegaly = uncertain when Cardiomegaly is otherwise unmentioned; No Finding = 1 iff
  no observation other than Support Devices (and none of CheXpert's "no finding" blockers) is
  positive or uncertain; unmentioned = ``None``.

Not NegBio: CE numbers are not directly comparable with the original CheXpert labeler's.

>>> label_report("No pleural effusion or pneumothorax.")["Pleural Effusion"]
0
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2r_core.classes import CHEXPERT_OBSERVATIONS

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Span

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
Label = int | None

DATA_DIR = Path(__file__).parent / "data"
PHRASES_DIR = DATA_DIR / "chexpert_phrases"
#: Upstream commit of the vendored phrase lists.
PHRASES_COMMIT = "44ddeb363149aa657296237f18b5472a73c1756f"
_NO_FINDING = "No Finding"
_SUPPORT_DEVICES = "Support Devices"
_BATCH = 64


def _observation(stem: str) -> str:
    return stem.replace("_", " ").title()


def _read_phrases(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.txt")):
        lines = [ln.strip().replace("_", " ") for ln in path.read_text().splitlines()]
        out[_observation(path.stem)] = [ln for ln in lines if ln.strip()]
    return out


def _compile(items: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{i})" for i in items), re.IGNORECASE)


@dataclass(frozen=True)
class Rules:
    """Phrase lists and the rules beyond ConText, loaded once (see :func:`rules`)."""

    name: str
    version: str
    mentions: dict[str, tuple[str, ...]]
    unmentions: dict[str, re.Pattern[str]]
    anatomy: dict[str, re.Pattern[str] | None]
    size_enlarged: re.Pattern[str]
    size_normal: re.Pattern[str]
    size_clause_breaks: re.Pattern[str]
    ignored_sections: frozenset[str]
    historical_drops: frozenset[str]
    chf: frozenset[str]


@lru_cache(maxsize=1)
def rules() -> Rules:
    """Load the phrase lists and ``labeler_rules.json`` (cached)."""
    extra = json.loads((DATA_DIR / "labeler_rules.json").read_text())
    mentions: dict[str, list[str]] = {}
    for obs, phrases in _read_phrases(PHRASES_DIR / "mention").items():
        # a mention starts at a word start ("tube" is not "tuberculosis"); it may end mid-word
        # ("atelecta" covers "atelectasis", "atelectatic")
        # (CheXpert's leading/trailing "_" word marks become boundaries, so the span is the word)
        mentions[obs] = [
            rf"(?<![a-z]){p.strip()}" + (r"(?![a-z])" if p.endswith(" ") else "") for p in phrases
        ]
    for obs, patterns in extra["extra_mentions"].items():
        mentions.setdefault(obs, []).extend(patterns)
    ignored = extra.get("ignored_chexpert_unmentions", {})
    unmentions: dict[str, list[str]] = {
        obs: [p for p in phrases if p not in ignored.get(obs, ())]
        for obs, phrases in _read_phrases(PHRASES_DIR / "unmention").items()
    }
    for obs, patterns in extra["extra_unmentions"].items():
        unmentions.setdefault(obs, []).extend(patterns)
    # None: every mention of the observation is anatomy
    anatomy = {
        obs: None if phrases == ["*"] else re.compile(f"(?:{'|'.join(phrases)})s?", re.IGNORECASE)
        for obs, phrases in extra["anatomy_mentions"].items()
    }
    return Rules(
        name=str(extra["name"]),
        version=str(extra["version"]),
        mentions={k: tuple(v) for k, v in mentions.items()},
        unmentions={k: _compile(v) for k, v in unmentions.items() if v},
        anatomy=anatomy,
        size_enlarged=_compile(extra["size_enlarged"]),
        size_normal=_compile(extra["size_normal"]),
        size_clause_breaks=_compile(extra["size_clause_breaks"]),
        ignored_sections=frozenset(extra["ignored_sections"]),
        historical_drops=frozenset(extra["historical_drops"]),
        chf=frozenset(extra["chf_mentions"]),
    )


@lru_cache(maxsize=1)
def pipeline() -> Language:
    """The medspaCy pipeline (built once per process; no model download)."""
    import spacy

    try:
        from medspacy.context import ConTextRule
        from medspacy.section_detection import SectionRule
        from medspacy.target_matcher import TargetRule
    except ImportError as exc:  # installed apart from d2r: see requirements-medspacy.txt
        raise ImportError(
            "the CE labeler needs medspaCy: pip install --no-deps -r requirements-medspacy.txt"
        ) from exc

    r = rules()
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    matcher: Any = nlp.add_pipe(
        "medspacy_target_matcher", config={"result_type": "group", "prune": False}
    )
    for obs, patterns in r.mentions.items():
        # one alternation per observation (the regex matcher rescans the text once per rule);
        # longer phrases first, so the longest mention at a position wins
        combined = "|".join(f"(?:{p})" for p in sorted(patterns, key=len, reverse=True))
        matcher.add([TargetRule(obs.lower(), obs, pattern=combined)])
    context: Any = nlp.add_pipe(
        "medspacy_context", config={"rules": None, "input_span_type": "group"}
    )
    context.add(ConTextRule.from_json(str(DATA_DIR / "context_rules.json")))
    sectionizer: Any = nlp.add_pipe(
        "medspacy_sectionizer", config={"rules": None, "input_span_type": "group"}
    )
    sectionizer.add(SectionRule.from_json(str(DATA_DIR / "section_rules.json")))
    return nlp


def prepare_text(text: str) -> str:
    """The labeler's view of raw text: whitespace collapsed, ``..`` -> ``.``."""
    t = re.sub(r"\.{2,}", ".", text)
    return re.sub(r"\s+", " ", t).strip()


@dataclass(frozen=True)
class Mention:
    """One labelled mention: observation, matched text, label and character span."""

    observation: str
    text: str
    label: int
    start: int
    end: int


def _size_label(span: Span, r: Rules) -> int | None:
    """Label of a heart / cardiomediastinum anatomy mention from its clause's size statement."""
    sent = span.sent
    text = sent.text
    s0 = span.start_char - sent.start_char
    e0 = span.end_char - sent.start_char
    left = 0
    for m in r.size_clause_breaks.finditer(text, 0, s0):
        left = m.end()
    right_m = r.size_clause_breaks.search(text, e0)
    right = right_m.start() if right_m else len(text)
    best: tuple[int, int] | None = None
    for pattern, label in ((r.size_normal, NEGATIVE), (r.size_enlarged, POSITIVE)):
        for m in pattern.finditer(text, left, right):
            if s0 <= m.start() < e0:  # the mention's own words
                continue
            distance = m.start() - e0 if m.start() >= e0 else s0 - m.end()
            # a statement after the mention (its predicate) wins ties
            key = (distance + (0 if m.start() >= e0 else 3), label)
            if best is None or key[0] < best[0] or (key[0] == best[0] and label == NEGATIVE):
                best = key
    return None if best is None else best[1]


def _mention_label(span: Span, r: Rules) -> int | None:
    obs = span.label_
    if span._.is_family or span._.is_hypothetical:
        return None
    if span._.is_historical and obs in r.historical_drops and not span._.is_negated:
        return None
    if obs in r.anatomy:
        anatomy = r.anatomy[obs]
        if anatomy is None or anatomy.fullmatch(span.text.strip()):
            label = _size_label(span, r)
            return UNCERTAIN if label == POSITIVE and span._.is_uncertain else label
    if span._.is_uncertain:
        return UNCERTAIN
    if span._.is_negated:
        return NEGATIVE
    return POSITIVE


def _doc_mentions(doc: Doc, r: Rules) -> list[Mention]:
    found: list[Mention] = []
    blocked: dict[str, list[tuple[int, int]]] = {
        obs: [m.span() for m in pattern.finditer(doc.text)] for obs, pattern in r.unmentions.items()
    }
    for span in sorted(doc.spans.get("medspacy_spans", []), key=lambda s: (s.start, s.end)):
        if span[0]._.section_category in r.ignored_sections:
            continue
        obs = span.label_
        if any(s < span.end_char and span.start_char < e for s, e in blocked.get(obs, ())):
            continue
        label = _mention_label(span, r)
        if label is not None:
            found.append(Mention(obs, span.text, label, span.start_char, span.end_char))
    return found


def _aggregate(found: Sequence[Mention], r: Rules) -> dict[str, Label]:
    per: dict[str, list[int]] = {}
    no_finding = True
    for m in found:
        if m.observation != _SUPPORT_DEVICES and m.label in (POSITIVE, UNCERTAIN):
            no_finding = False
        if m.observation == _NO_FINDING:
            continue
        per.setdefault(m.observation, []).append(m.label)
    chf = any(m.label in (POSITIVE, UNCERTAIN) and m.text.lower() in r.chf for m in found)
    if chf and "Cardiomegaly" not in per:
        per["Cardiomegaly"] = [UNCERTAIN]
    out: dict[str, Label] = {}
    for observation in CHEXPERT_OBSERVATIONS:
        if observation == _NO_FINDING:
            out[observation] = POSITIVE if no_finding else None
            continue
        labels = per.get(observation)
        if not labels:
            out[observation] = None
        elif POSITIVE in labels:
            out[observation] = POSITIVE
        elif UNCERTAIN in labels:
            out[observation] = UNCERTAIN
        else:
            out[observation] = NEGATIVE
    return out


def mentions(text: str) -> list[Mention]:
    """Labelled mentions in ``prepare_text(text)``, in reading order (offsets into that text)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\[W036\]")
        doc = pipeline()(prepare_text(text))
    return _doc_mentions(doc, rules())


def label_reports(texts: Iterable[str]) -> list[dict[str, Label]]:
    """Label many reports (batched through the pipeline); see :func:`label_report`."""
    r = rules()
    with warnings.catch_warnings():
        # W036: the target matcher's token Matcher is empty (every mention rule is a regex)
        warnings.filterwarnings("ignore", message=r"\[W036\]")
        docs = list(pipeline().pipe((prepare_text(t) for t in texts), batch_size=_BATCH))
    return [_aggregate(_doc_mentions(doc, r), r) for doc in docs]


def label_report(text: str) -> dict[str, Label]:
    """Label one report: observation -> 1 / 0 / -1 / ``None`` (blank), CheXpert order."""
    return label_reports([text])[0]


def labeler_info() -> dict[str, Any]:
    """Name, version and library versions of the labeler (for ``metrics.json``)."""
    from importlib import metadata

    r = rules()
    return {
        "name": r.name,
        "version": r.version,
        "medspacy": metadata.version("medspacy"),
        "spacy": metadata.version("spacy"),
        "phrase_list_commit": PHRASES_COMMIT,
    }


__all__ = [
    "CHEXPERT_OBSERVATIONS",
    "NEGATIVE",
    "PHRASES_COMMIT",
    "POSITIVE",
    "UNCERTAIN",
    "Label",
    "Mention",
    "label_report",
    "label_reports",
    "labeler_info",
    "mentions",
    "pipeline",
    "prepare_text",
    "rules",
]
