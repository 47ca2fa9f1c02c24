"""Decoding: beam search over the report decoder and the hypotheses it keeps.

Shapes use ``B`` batch, ``k`` beams, ``d`` decoder width, ``N`` decoder layers, ``L`` visual
tokens, ``M`` memory slots and ``V`` vocabulary. :func:`beam_hypotheses` returns every image's
final beams, best first (a report chooser may pick among them); :func:`beam_search` returns the
most probable one, the report :meth:`model.modeling.D2RNet.generate` writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from model.decoder import ReportDecoder
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID


def _banned_trigram_tokens(seq: list[int]) -> set[int]:
    if len(seq) < 3:
        return set()
    key = (seq[-2], seq[-1])
    return {seq[i + 2] for i in range(len(seq) - 2) if (seq[i], seq[i + 1]) == key}


@dataclass(frozen=True)
class Hypothesis:
    """One finished (or length-capped) beam: ids without BOS, cut before EOS, and its summed
    log-probability."""

    ids: tuple[int, ...]
    logprob: float


# Longer than a screen: the beam search loop, with tensor shapes commented at each step, reads
# best as one piece
@torch.no_grad()
def beam_hypotheses(
    decoder: ReportDecoder,
    context: Tensor,
    cross: Tensor,
    enc_mask: Tensor,
    *,
    beam_size: int,
    max_tokens: int,
    no_repeat_trigram: bool = False,
) -> list[list[Hypothesis]]:
    """Beam search (``beam_size`` 1 = greedy): every image's final beams, best first.

    ``context``, ``cross`` and ``enc_mask`` describe each image (:meth:`ReportDecoder.prepare`).
    Scores are summed log-probs (no length penalty). PAD and BOS are never generated and
    ``<sep>`` at most once. Each image gets up to ``beam_size`` distinct hypotheses, sorted by
    log-probability (beams that never got a finite score are left out).
    """
    b, device = context.shape[0], context.device
    k = beam_size
    context = context.repeat_interleave(k, dim=0)  # (B*k,1,d)
    cross = cross.repeat_interleave(k, dim=0)  # (B*k,2N,L,d)
    enc_mask = enc_mask.repeat_interleave(k, dim=0)
    tokens = torch.full((b * k, 1), BOS_ID, dtype=torch.long, device=device)
    memory, cache = decoder.initial_state(b * k, device)  # (B*k,M,d), (B*k,2N,0,d)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    for _ in range(max_tokens - 1):
        # (B*k,V), (B*k,M,d), (B*k,2N,1,d)
        logp, mem_out, entries = decoder.step(
            tokens[:, -1:], memory, cache, context, cross, enc_mask
        )
        logp = logp.clone()
        logp[:, PAD_ID] = float("-inf")
        logp[:, BOS_ID] = float("-inf")
        # tensor ops, not a Python loop over rows: this runs once per generated token
        logp[:, SEP_ID].masked_fill_((tokens == SEP_ID).any(dim=1), float("-inf"))
        if no_repeat_trigram:
            for row, seq in enumerate(tokens.tolist()):
                for tok in _banned_trigram_tokens(seq):
                    logp[row, tok] = float("-inf")
        done = finished.flatten()
        logp.masked_fill_(done[:, None], float("-inf"))
        logp[:, PAD_ID].masked_fill_(done, 0.0)  # finished beams only extend with PAD at no cost
        vocab = logp.shape[-1]
        cand = (scores.flatten()[:, None] + logp).view(b, k * vocab)
        top, idx = cand.topk(k, dim=-1)  # (B,k)
        origin = idx // vocab + torch.arange(b, device=device)[:, None] * k  # (B,k) flat rows
        nxt = (idx % vocab).flatten()
        origin = origin.flatten()
        tokens = torch.cat([tokens[origin], nxt[:, None]], dim=1)
        memory = mem_out[origin]
        cache = torch.cat([cache, entries], dim=2)[origin]
        finished = (finished.flatten()[origin] | (nxt == EOS_ID)).view(b, k)
        scores = top
        if bool(finished.all()):
            break
    out: list[list[Hypothesis]] = []
    rows, final = tokens[:, 1:].tolist(), scores.tolist()
    for i in range(b):
        beams = []
        for j in sorted(range(k), key=lambda j: -final[i][j]):  # stable: ties keep beam order
            if not math.isfinite(final[i][j]):
                continue
            seq = [t for t in rows[i * k + j] if t != PAD_ID]
            seq = seq[: seq.index(EOS_ID)] if EOS_ID in seq else seq
            beams.append(Hypothesis(tuple(seq), float(final[i][j])))
        out.append(beams)
    return out


def beam_search(
    decoder: ReportDecoder,
    context: Tensor,
    cross: Tensor,
    enc_mask: Tensor,
    *,
    beam_size: int,
    max_tokens: int,
    no_repeat_trigram: bool = False,
) -> list[list[int]]:
    """The most probable hypothesis of :func:`beam_hypotheses` per image (ids without BOS,
    cut before EOS)."""
    beams = beam_hypotheses(
        decoder,
        context,
        cross,
        enc_mask,
        beam_size=beam_size,
        max_tokens=max_tokens,
        no_repeat_trigram=no_repeat_trigram,
    )
    return [list(h[0].ids) if h else [] for h in beams]


__all__ = ["Hypothesis", "beam_hypotheses", "beam_search"]
