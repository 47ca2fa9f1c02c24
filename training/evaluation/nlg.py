"""NLG metrics through ``pycocoevalcap`` 1.2 (BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D).

Texts are normalised by mode (``r2gen``: R2Gen cleaning; ``coco``: PTB tokenizer) and BLEU is
cross-checked against ``sacrebleu``; a mismatch raises :class:`~training.errors.MetricError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from training.errors import MetricError
from training.evaluation.normalise import r2gen_clean

logger = logging.getLogger(__name__)

NLG_MODES = ("r2gen", "coco")
SACREBLEU_TOLERANCE = 1e-4


@dataclass(frozen=True)
class NlgResult:
    """Corpus scores, per-report scores and timings."""

    scores: dict[str, float]
    per_report: dict[str, dict[str, float]]
    timings: dict[str, float] = field(default_factory=dict)


def tokenize(
    ids: Sequence[str],
    refs: Sequence[str],
    gens: Sequence[str],
    mode: str,
    *,
    truncate_refs: int | None = None,
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Return ``(gts, res)`` dicts of normalised, space-joined token strings."""
    if mode == "r2gen":
        gts = {i: [r2gen_clean(r)] for i, r in zip(ids, refs, strict=True)}
        res = {i: [r2gen_clean(g)] for i, g in zip(ids, gens, strict=True)}
    elif mode == "coco":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": r}] for i, r in zip(ids, refs, strict=True)})
        res = tok.tokenize({i: [{"caption": g}] for i, g in zip(ids, gens, strict=True)})
    else:
        raise ValueError(f"nlg_mode: must be one of {NLG_MODES}, got {mode!r}")
    if truncate_refs:
        gts = {i: [" ".join(v[0].split()[:truncate_refs])] for i, v in gts.items()}
    return gts, res


def _sacrebleu_check(
    gts: dict[str, list[str]], res: dict[str, list[str]], bleu: Sequence[float]
) -> dict[str, float]:
    from sacrebleu.metrics.bleu import BLEU

    keys = list(gts)
    hyps = [res[k][0] for k in keys]
    refs = [[gts[k][0] for k in keys]]
    out = {}
    for n in range(1, 5):
        metric = BLEU(
            tokenize="none", smooth_method="none", effective_order=False, max_ngram_order=n
        )
        value = metric.corpus_score(hyps, refs).score / 100.0
        out[f"bleu_{n}"] = value
        if abs(value - bleu[n - 1]) > SACREBLEU_TOLERANCE:
            raise MetricError(
                f"BLEU-{n}: pycocoevalcap {bleu[n - 1]:.6f} != sacrebleu "
                f"{value:.6f} (tolerance {SACREBLEU_TOLERANCE})"
            )
    return out


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, scores = scorer.compute_score(gts, res)
    finally:
        proc = scorer.meteor_p
        proc.stdin.close()
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return float(score), [float(s) for s in scores]


def compute_nlg(
    ids: Sequence[str],
    refs: Sequence[str],
    gens: Sequence[str],
    *,
    mode: str = "r2gen",
    truncate_refs: int | None = None,
    check_sacrebleu: bool = True,
) -> NlgResult:
    """Score generated reports against references (one reference per report)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    timings: dict[str, float] = {}
    t = time.perf_counter()
    gts, res = tokenize(ids, refs, gens, mode, truncate_refs=truncate_refs)
    timings["tokenize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    bleu, bleu_sent = Bleu(4).compute_score(gts, res, verbose=0)
    timings["bleu_s"] = time.perf_counter() - t
    t = time.perf_counter()
    meteor, meteor_seg = _meteor(gts, res)
    timings["meteor_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rouge, rouge_seg = Rouge().compute_score(gts, res)
    timings["rouge_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cider, _ = Cider().compute_score(gts, res)
    timings["cider_s"] = time.perf_counter() - t
    scores: dict[str, Any] = {f"bleu_{n + 1}": float(bleu[n]) for n in range(4)}
    scores.update(meteor=meteor, rouge_l=float(rouge), cider=float(cider))
    if check_sacrebleu:
        t = time.perf_counter()
        _sacrebleu_check(gts, res, bleu)
        timings["sacrebleu_check_s"] = time.perf_counter() - t
    keys = list(gts)
    per_report = {
        k: {
            "rouge_l": float(rouge_seg[i]),
            "meteor_segment": meteor_seg[i],
            "sentence_bleu_4": float(bleu_sent[3][i]),
        }
        for i, k in enumerate(keys)
    }
    return NlgResult(scores=scores, per_report=per_report, timings=timings)


__all__ = ["NLG_MODES", "NlgResult", "compute_nlg", "tokenize"]
