"""Training losses of D2R-Net: the language-model loss and the LAB/GAB alignment losses.

Shapes use ``B`` batch, ``T`` tokens, ``V`` vocabulary, ``R`` image units, ``U`` text units
and ``D`` visual dim. :class:`AlignmentLosses` holds the alignment text encoder (a
``transformers.BertModel``); the serving path never builds it, so only training needs a text
model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.branches import VisualFeatures
from model.config import ModelConfig
from model.tokenizer import PAD_ID


def lm_loss(logprobs: Tensor, tokens: Tensor) -> Tensor:
    """Mean NLL of ``tokens[:, 1:]`` over non-PAD positions."""
    target = tokens[:, 1:]
    nll = -logprobs.gather(-1, target[..., None]).squeeze(-1)
    keep = (target != PAD_ID).to(nll.dtype)
    return (nll * keep).sum() / keep.sum().clamp(min=1.0)


def cross_attention_similarity(
    img: Tensor, img_mask: Tensor, txt: Tensor, txt_mask: Tensor, temperature: float
) -> Tensor:
    """SCAN-style text-to-image similarity for every (image, text) pair in a batch.

    Each text unit attends over the image units (softmax of ``temperature`` x
    cosine), and its cosine with the attended vector is averaged over units.

    Parameters
    ----------
    img : ``(B,R,D)`` image units, ``img_mask`` ``(B,R)``
    txt : ``(B,U,D)`` text units, ``txt_mask`` ``(B,U)``

    Returns
    -------
    Tensor
        ``(B_img, B_txt)`` similarity matrix.
    """
    img = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    cos = torch.einsum("ird,jud->ijur", img, txt)  # (Bi,Bt,U,R)
    # finfo.min, not -inf: an image without any valid unit gets finite (ignored) similarities
    # instead of NaNs whose gradients would poison the whole batch
    logits = (temperature * cos).masked_fill(
        ~img_mask[:, None, None, :], torch.finfo(cos.dtype).min
    )
    attn = torch.softmax(logits, dim=-1)
    attended = F.normalize(torch.einsum("ijur,ird->ijud", attn, img), dim=-1)  # (Bi,Bt,U,D)
    unit_sim = (attended * txt[None]).sum(-1)  # (Bi,Bt,U)
    weight = txt_mask[None].to(unit_sim.dtype)
    return (unit_sim * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)


def ranking_loss(sim: Tensor, margin: float) -> Tensor:
    """Hinge triplet ranking loss (sum over in-batch negatives, both directions)."""
    pos = sim.diag()
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    cost_txt = (margin + sim - pos[:, None]).clamp(min=0).masked_fill(eye, 0.0)
    cost_img = (margin + sim - pos[None, :]).clamp(min=0).masked_fill(eye, 0.0)
    return (cost_txt.sum() + cost_img.sum()) / sim.shape[0]


class AlignmentLosses(nn.Module):
    """LAB (regions <-> sentences) and GAB (patches <-> words), training only.

    One shared text encoder (a ``transformers.BertModel``) embeds the report's
    words and, separately, each sentence ([CLS] state); linear projections map
    both to the visual dim. Losses: hinge ranking (margin, temperature from the
    config). Inference never builds this module, so serving needs no text model.
    """

    def __init__(self, cfg: ModelConfig, text_encoder: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.text = text_encoder
        hidden = int(getattr(text_encoder, "config").hidden_size)  # noqa: B009
        self.word_proj = nn.Linear(hidden, cfg.visual_dim)
        self.sentence_proj = nn.Linear(hidden, cfg.visual_dim)
        self.lab_proj = nn.Linear(cfg.visual_dim, cfg.visual_dim)  # region side of LAB
        self.gab_proj = nn.Linear(cfg.visual_dim, cfg.visual_dim)  # patch side of GAB

    @classmethod
    def from_pretrained(
        cls,
        cfg: ModelConfig,
        directory: Path,
        *,
        freeze: bool = False,
    ) -> AlignmentLosses:
        """Load the text encoder from a local ``transformers`` directory."""
        from transformers import BertModel

        text = BertModel.from_pretrained(str(directory), local_files_only=True)
        if freeze:
            text.requires_grad_(False)
        return cls(cfg, text)

    def forward(
        self,
        feats: VisualFeatures,
        report_ids: Tensor,
        report_mask: Tensor,
        sentence_ids: Tensor,
        sentence_mask: Tensor,
    ) -> dict[str, Any]:
        """Alignment losses.

        Parameters
        ----------
        feats : VisualFeatures
            From :meth:`model.modeling.D2RNet.visual_features`.
        report_ids, report_mask : Tensor
            ``(B,L)`` text-encoder ids of the whole report and attention mask.
        sentence_ids, sentence_mask : Tensor
            ``(B,Ns,Ls)`` ids of each sentence and mask; an all-zero mask row
            marks a padding sentence.
        """
        words = self.text(input_ids=report_ids, attention_mask=report_mask).last_hidden_state
        words = self.word_proj(words)  # (B,L,D)
        b, ns, ls = sentence_ids.shape
        flat = self.text(
            input_ids=sentence_ids.reshape(b * ns, ls),
            attention_mask=sentence_mask.reshape(b * ns, ls),
        ).last_hidden_state
        sentences = self.sentence_proj(flat[:, 0]).reshape(b, ns, -1)  # (B,Ns,D)
        sent_valid = sentence_mask.any(dim=-1)
        t = self.cfg.align_temperature
        lab_sim = cross_attention_similarity(
            self.lab_proj(feats.regions), feats.region_mask, sentences, sent_valid, t
        )
        patch_mask = torch.ones(
            feats.patches.shape[:2], dtype=torch.bool, device=feats.patches.device
        )
        gab_sim = cross_attention_similarity(
            self.gab_proj(feats.patches), patch_mask, words, report_mask.bool(), t
        )
        # images without any real box carry no local evidence: LAB uses the rest
        has_box = feats.region_mask.any(dim=1)
        lab = (
            ranking_loss(lab_sim[has_box][:, has_box], self.cfg.align_margin)
            if int(has_box.sum()) > 1
            else lab_sim.new_zeros(())
        )
        gab = ranking_loss(gab_sim, self.cfg.align_margin)
        return {"lab": lab, "gab": gab, "lab_similarity": lab_sim, "gab_similarity": gab_sim}


__all__ = ["AlignmentLosses", "cross_attention_similarity", "lm_loss", "ranking_loss"]
