"""Text normalisation for NLG scoring: R2Gen's MIMIC cleaning (``r2gen``).

>>> r2gen_clean("Endotracheal tube terminates 4.5 cm above the carina. Lungs are clear.")
'endotracheal tube terminates 45 cm above the carina . lungs are clear .'
"""

from __future__ import annotations

import re

_NUMBERED = (
    (". 2. ", ". "),
    (". 3. ", ". "),
    (". 4. ", ". "),
    (". 5. ", ". "),
    (" 2. ", ". "),
    (" 3. ", ". "),
    (" 4. ", ". "),
    (" 5. ", ". "),
)
# ``:-\[`` is a range (0x3A-0x5B): ``: ; < = > ? @ [`` go, a literal ``-`` stays
_DROP = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")


def _report_sentences(text: str) -> list[str]:
    t = text.replace("\n", " ")
    t = re.sub(r"_{2,}", "_", t)
    t = re.sub(r" {2,}", " ", t)
    t = re.sub(r"\.{2,}", ".", t)
    t = t.replace("1. ", "")
    for old, new in _NUMBERED:
        t = t.replace(old, new)
    return t.strip().lower().split(". ")


def _clean_sentence(sentence: str) -> str:
    s = sentence.replace('"', "").replace("/", "").replace("\\", "").replace("'", "")
    return _DROP.sub("", s.strip().lower())


def r2gen_clean(text: str) -> str:
    """R2Gen's MIMIC report cleaning; the result's whitespace split is the token list."""
    return " . ".join(_clean_sentence(s) for s in _report_sentences(text)) + " ."


__all__ = ["r2gen_clean"]
