"""Rule-based CheXpert-style labeler ("CE-rb"): 14 observations from report text.

Mentions come from the vendored CheXpert labeler phrase lists (``data/chexpert_phrases``, MIT);
each mention is classified by trigger-window rules (``data/triggers.json``), in this order:
pre-negation uncertainty -> negation -> uncertainty -> positive. Per report: positive >
uncertain > negative; a positive or uncertain "chf"/"heart failure" adds Cardiomegaly =
uncertain; No Finding = 1 iff no category other than Support Devices is positive or
uncertain. Unmentioned = blank (``None``).

This is a NegEx-class reimplementation, not NegBio: not directly comparable with CE numbers
computed with the original CheXpert labeler or CheXbert.

>>> label_report("No pleural effusion or pneumothorax.")["Pleural Effusion"]
0
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from model.classes import CHEXPERT_OBSERVATIONS

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
Label = int | None

DATA_DIR = Path(__file__).parent / "data"
PHRASES_DIR = DATA_DIR / "chexpert_phrases"
#: Upstream commit of the vendored phrase lists.
PHRASES_COMMIT = "44ddeb363149aa657296237f18b5472a73c1756f"


def _observation(stem: str) -> str:
    return stem.replace("_", " ").title()


@dataclass(frozen=True)
class _Rules:
    mentions: dict[str, tuple[re.Pattern[str], ...]]
    unmentions: dict[str, tuple[re.Pattern[str], ...]]
    clause_breaks: re.Pattern[str]
    pre_neg_unc: tuple[re.Pattern[str], ...]
    neg_pre: tuple[re.Pattern[str], ...]
    neg_post: tuple[re.Pattern[str], ...]
    unc_pre: tuple[re.Pattern[str], ...]
    unc_post: tuple[re.Pattern[str], ...]
    stable: tuple[re.Pattern[str], ...]
    name: str
    version: str


def _read_phrases(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.txt")):
        lines = [ln.strip().replace("_", " ") for ln in path.read_text().splitlines()]
        out[_observation(path.stem)] = [ln for ln in lines if ln.strip()]
    return out


@lru_cache(maxsize=1)
def rules() -> _Rules:
    """Load and compile the phrase lists and trigger vocabularies (cached)."""
    triggers = json.loads((DATA_DIR / "triggers.json").read_text())
    mentions = _read_phrases(PHRASES_DIR / "mention")
    unmentions = _read_phrases(PHRASES_DIR / "unmention")
    positional = [
        p + s
        for p in triggers["extra_unmention_prefixes"]
        for s in triggers["extra_unmention_suffixes"]
    ]
    unmentions["Cardiomegaly"] = [
        f"{p} {m.replace('the ', '')}"
        for p in positional
        for m in mentions["Cardiomegaly"]
        if m not in ("cardiomegaly", "cardiac enlargement")
    ]
    unmentions["Enlarged Cardiomediastinum"] = [
        f"{p} {m}" for p in positional for m in mentions["Enlarged Cardiomediastinum"]
    ]

    def comp(items: list[str]) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(i) for i in items)

    return _Rules(
        mentions={k: comp(v) for k, v in mentions.items()},
        unmentions={k: comp(v) for k, v in unmentions.items()},
        clause_breaks=re.compile("|".join(triggers["clause_breaks"])),
        pre_neg_unc=comp(triggers["pre_negation_uncertainty"]),
        neg_pre=comp(triggers["negation_pre"]),
        neg_post=comp(triggers["negation_post"]),
        unc_pre=comp(triggers["uncertainty_pre"]),
        unc_post=comp(triggers["uncertainty_post"]),
        stable=comp(triggers["stable_silhouette"]),
        name=str(triggers["name"]),
        version=str(triggers["version"]),
    )


def prepare_text(text: str) -> str:
    """Lowercase, ``..`` -> ``.``, punctuation spaced (the labeler's view of raw text)."""
    t = text.replace("\n", " ").lower()
    t = re.sub(r"\.{2,}", ".", t)
    t = re.sub(r"([,;:?!()])", r" \1 ", t)
    return re.sub(r"\s+", " ", t).strip()


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.;?!])\s+", text) if s.strip()]


def _classify(sentence: str, start: int, end: int, observation: str, r: _Rules) -> int:
    # negation and uncertainty scope: the clause between breaks around the mention
    left_cut = 0
    for m in r.clause_breaks.finditer(sentence, 0, start):
        left_cut = m.end()
    right = r.clause_breaks.search(sentence, end)
    before = sentence[left_cut:start]
    after = sentence[end : right.start() if right else len(sentence)]
    clause = before + sentence[start:end] + after
    if any(p.search(clause) for p in r.pre_neg_unc):
        return UNCERTAIN
    if any(p.search(before) for p in r.neg_pre) or any(p.search(after) for p in r.neg_post):
        return NEGATIVE
    if any(p.search(before) for p in r.unc_pre) or any(p.search(after) for p in r.unc_post):
        return UNCERTAIN
    if observation in ("Enlarged Cardiomediastinum", "Cardiomegaly") and any(
        p.search(clause) for p in r.stable
    ):
        return UNCERTAIN
    return POSITIVE


def mentions(text: str) -> list[tuple[str, str, int]]:
    """All (observation, matched text, label) mentions in ``text``, in reading order."""
    r = rules()
    found: list[tuple[str, str, int]] = []
    for sentence in _sentences(prepare_text(text)):
        for observation, patterns in r.mentions.items():
            blockers = r.unmentions.get(observation, ())
            for pattern in patterns:
                for m in pattern.finditer(sentence):
                    s, e = m.span()
                    if s == e:
                        continue
                    if any(
                        u.start() < e and s < u.end()
                        for b in blockers
                        for u in b.finditer(sentence)
                    ):
                        continue
                    found.append(
                        (observation, m.group(0), _classify(sentence, s, e, observation, r))
                    )
    return found


def label_report(text: str) -> dict[str, Label]:
    """Label one report: observation -> 1 / 0 / -1 / ``None`` (blank), CheXpert order."""
    per: dict[str, list[int]] = {}
    no_finding = True
    for observation, matched, label in mentions(text):
        if observation != "Support Devices" and label in (POSITIVE, UNCERTAIN):
            no_finding = False
        if observation == "No Finding":
            continue
        if label in (POSITIVE, UNCERTAIN) and matched.strip() in ("chf", "heart failure"):
            per.setdefault("Cardiomegaly", []).append(UNCERTAIN)
        per.setdefault(observation, []).append(label)
    out: dict[str, Label] = {}
    for observation in CHEXPERT_OBSERVATIONS:
        if observation == "No Finding":
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


__all__ = [
    "CHEXPERT_OBSERVATIONS",
    "NEGATIVE",
    "PHRASES_COMMIT",
    "POSITIVE",
    "UNCERTAIN",
    "label_report",
    "mentions",
    "prepare_text",
    "rules",
]
