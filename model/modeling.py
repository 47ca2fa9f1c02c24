"""D2R-Net: lesion detector, global/local visual encoder, memory-driven decoder, composed.

Shapes use ``B`` batch, ``S`` image side, ``K`` boxes, ``N`` patch tokens,
``D`` visual dim, ``d`` decoder width, ``T`` tokens, ``V`` vocabulary,
``M`` memory slots, ``A`` detector locations, ``C`` classes.

Inference path (:class:`D2RNet`)::

    image (B,1,S,S) in [0,1] -> InputStem -> (B,3,S,S) ImageNet-normalised
      -> LesionDetector.dense  -> (B,A,C),(B,A,4),(B,A,1)  -> host: decode + NMS -> boxes
      -> VisualEncoder(image, boxes (B,K,4), box_mask (B,K), box_scores (B,K,C))
           -> tokens (B,N+K,D), mask
      -> ReportDecoder.encode -> (B,N+K,d) -> generate()/step() -> token ids

The parts live in their own modules: :mod:`model.backbone` (input stem, ResNet trunks),
:mod:`model.detector`, :mod:`model.branches` (global and local branches, LERA),
:mod:`model.decoder` and :mod:`model.decoding` (beam search). The training losses, LAB and GAB
with their text encoder included, live in :mod:`training.losses`; the inference path never
builds them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from model.backbone import InputStem
from model.branches import VisualEncoder, VisualFeatures
from model.config import ModelConfig
from model.decoder import ReportDecoder
from model.decoding import beam_search
from model.detector import Detections, LesionDetector, select_boxes


class D2RNet(nn.Module):
    """Detector + global/local visual encoder + memory-driven report decoder."""

    def __init__(self, cfg: ModelConfig, *, global_weights: Path | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.stem = InputStem()
        self.detector = LesionDetector(cfg)
        self.visual = VisualEncoder(cfg)
        self.decoder = ReportDecoder(cfg)
        if global_weights is not None:
            self.visual.global_branch.load_trunk_weights(global_weights)

    def encode(
        self, image: Tensor, boxes: Tensor, box_mask: Tensor, box_scores: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Image ``(B,1,S,S)``, boxes ``(B,K,4)``, mask ``(B,K)``, class scores ``(B,K,C)``
        -> encoder states and mask."""
        feats = self.visual_features(image, boxes, box_mask, box_scores)
        return self.decoder.encode(feats.tokens, feats.mask), feats.mask

    def decoding_inputs(
        self, image: Tensor, boxes: Tensor, box_mask: Tensor, box_scores: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`encode` then :meth:`ReportDecoder.prepare`: the visual context ``(B,1,d)``,
        cross-attention keys/values ``(B,2N,L,d)`` and encoder mask ``(B,L)``."""
        enc, mask = self.encode(image, boxes, box_mask, box_scores)
        context, cross = self.decoder.prepare(enc, mask)
        return context, cross, mask

    def visual_features(
        self,
        image: Tensor,
        boxes: Tensor,
        box_mask: Tensor,
        box_scores: Tensor,
        trunk_features: Tensor | None = None,
        trunk_stages: int = 4,
    ) -> VisualFeatures:
        """Patch and region tokens (training); ``trunk_features`` as in
        :class:`model.branches.GlobalBranch`."""
        feats: VisualFeatures = self.visual(
            image, self.stem(image), boxes, box_mask, box_scores, trunk_features, trunk_stages
        )
        return feats

    def forward(
        self, image: Tensor, boxes: Tensor, box_mask: Tensor, box_scores: Tensor, tokens: Tensor
    ) -> Tensor:
        """Teacher forcing on ids ``(B,T)``: log-probs ``(B,T-1,V)`` of ``tokens[:, 1:]``."""
        enc, mask = self.encode(image, boxes, box_mask, box_scores)
        out: Tensor = self.decoder(enc, mask, tokens[:, :-1])
        return out

    @torch.no_grad()
    def detect(
        self,
        image: Tensor,
        *,
        score_threshold: float,
        iou_threshold: float,
        max_detections: int,
        class_agnostic: bool,
    ) -> list[Detections]:
        """Run the detector and decode its boxes on the host."""
        dense = self.detector.dense(self.stem(image))
        return self.detector.postprocess(
            *dense,
            score_threshold=score_threshold,
            iou_threshold=iou_threshold,
            max_detections=max_detections,
            class_agnostic=class_agnostic,
        )

    @torch.no_grad()
    def generator_boxes(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Top-K class-agnostic boxes above ``box_score_threshold`` -> ``(B,K,4)`` boxes,
        ``(B,K)`` mask, ``(B,K,C)`` class scores (see :func:`select_boxes`)."""
        c = self.config
        dets = self.detect(
            image,
            score_threshold=c.box_score_threshold,
            iou_threshold=c.box_nms_iou,
            max_detections=c.num_boxes,
            class_agnostic=True,
        )
        return select_boxes(dets, c.num_boxes, c.num_classes, image.device)

    @torch.no_grad()
    def generate(
        self,
        image: Tensor,
        boxes: Tensor,
        box_mask: Tensor,
        box_scores: Tensor,
        *,
        beam_size: int | None = None,
        max_tokens: int | None = None,
        no_repeat_trigram: bool | None = None,
    ) -> list[list[int]]:
        """Report ids per image (no BOS/EOS); defaults come from the config."""
        c = self.config
        context, cross, mask = self.decoding_inputs(image, boxes, box_mask, box_scores)
        return beam_search(
            self.decoder,
            context,
            cross,
            mask,
            beam_size=beam_size or c.beam_size,
            max_tokens=max_tokens or c.max_tokens,
            no_repeat_trigram=c.no_repeat_trigram
            if no_repeat_trigram is None
            else no_repeat_trigram,
        )


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["D2RNet", "count_parameters"]
