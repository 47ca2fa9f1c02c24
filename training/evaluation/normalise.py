"""Text normalisation for NLG scoring: R2Gen's MIMIC cleaning (``r2gen``).

The same cleaning the tokenizer applies to training reports (:func:`model.tokenizer.clean_report`),
so scores are computed on exactly the text the model learns from.

>>> r2gen_clean("Endotracheal tube terminates 4.5 cm above the carina. Lungs are clear.")
'endotracheal tube terminates 45 cm above the carina . lungs are clear .'
"""

from __future__ import annotations

from model.tokenizer import clean_report


def r2gen_clean(text: str) -> str:
    """R2Gen's MIMIC report cleaning; the result's whitespace split is the token list."""
    return clean_report(text)


__all__ = ["r2gen_clean"]
