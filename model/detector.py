"""The lesion detector: FCOS on a ResNet-FPN, its host-side box decoding and box selection.

Shapes use ``B`` batch, ``S`` image side, ``A`` detector locations, ``C`` classes and ``K``
boxes. The network part (:meth:`LesionDetector.dense`) ends at the dense head outputs so it
exports to ONNX/TensorRT as is; :meth:`LesionDetector.postprocess` decodes boxes and runs NMS
on the host, and :func:`select_boxes` pads the top boxes into the generator's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import batched_nms, nms
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from model.backbone import IMAGENET_MEAN, IMAGENET_STD, build_resnet
from model.config import DETECTOR_STRIDES, ModelConfig


@dataclass(frozen=True)
class Detections:
    """Boxes of one image in the model frame (host side)."""

    boxes: Tensor  # (n, 4) xyxy, model-frame pixels
    scores: Tensor  # (n,)
    labels: Tensor  # (n,) class index into VINDR_CLASSES


class LesionDetector(nn.Module):
    """FCOS (one-stage, anchor-free) on a ResNet-FPN, 22 classes, dense head only.

    The graph ends at the dense head outputs; box decoding and NMS run on the
    host (:meth:`postprocess`) so the dense part exports to ONNX/TensorRT as is.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        trunk = build_resnet(cfg.detector_backbone, norm_layer=nn.BatchNorm2d)
        widths = [trunk.layer2[-1], trunk.layer3[-1], trunk.layer4[-1]]
        in_channels = [_block_out_channels(b) for b in widths]
        ch = cfg.detector_fpn_channels
        backbone = BackboneWithFPN(
            trunk,
            {"layer2": "0", "layer3": "1", "layer4": "2"},
            in_channels,
            ch,
            extra_blocks=LastLevelP6P7(ch, ch),
        )
        anchors = AnchorGenerator(
            sizes=tuple((s,) for s in DETECTOR_STRIDES),
            aspect_ratios=((1.0,),) * len(DETECTOR_STRIDES),
        )
        head = FCOSHead(ch, 1, cfg.num_classes, num_convs=cfg.detector_head_convs)
        # FCOS keeps its (parameter-free) GeneralizedRCNNTransform; we bypass it and feed the
        # letterboxed, normalised model input directly.
        self.fcos = FCOS(
            backbone,
            cfg.num_classes,
            min_size=cfg.image_size,
            max_size=cfg.image_size,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
            anchor_generator=anchors,
            head=head,
        )
        self.image_size = cfg.image_size
        self.num_classes = cfg.num_classes

    def dense(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised image ``(B,3,S,S)`` -> class logits ``(B,A,C)``, box regression
        ``(B,A,4)``, centerness logits ``(B,A,1)``."""
        features = list(self.fcos.backbone(x).values())  # 5 levels, (B,ch,S/8..S/128)
        out = self.fcos.head(features)
        return out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]

    def anchors(self, device: torch.device | str = "cpu") -> Tensor:
        """FCOS location anchors ``(A,4)`` for the fixed input size (stride-sized squares)."""
        parts = []
        for stride in DETECTOR_STRIDES:
            n = self.image_size // stride
            shifts = torch.arange(n, dtype=torch.float32, device=device) * stride
            yy, xx = torch.meshgrid(shifts, shifts, indexing="ij")
            ctr = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 4)
            half = float(stride) / 2
            parts.append(ctr + torch.tensor([-half, -half, half, half], device=device))
        return torch.cat(parts)

    def num_anchors_per_level(self) -> list[int]:
        """Locations per FPN level."""
        return [(self.image_size // s) ** 2 for s in DETECTOR_STRIDES]

    def loss(self, x: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """FCOS training losses; ``targets[i]`` holds model-frame ``boxes`` and ``labels``."""
        cls_logits, bbox_reg, ctr = self.dense(x)
        anchors = self.anchors(x.device)
        losses: dict[str, Tensor] = self.fcos.compute_loss(
            targets,
            {"cls_logits": cls_logits, "bbox_regression": bbox_reg, "bbox_ctrness": ctr},
            [anchors] * x.shape[0],
            self.num_anchors_per_level(),
        )
        return losses

    @torch.no_grad()
    def postprocess(
        self,
        cls_logits: Tensor,
        bbox_reg: Tensor,
        ctrness: Tensor,
        *,
        score_threshold: float,
        iou_threshold: float,
        max_detections: int,
        class_agnostic: bool,
        candidates: int = 1000,
    ) -> list[Detections]:
        """Host-side decoding of dense outputs: score, top candidates, boxes, NMS."""
        anchors = self.anchors(cls_logits.device)
        results = []
        for logits, reg, ctr in zip(cls_logits, bbox_reg, ctrness, strict=True):
            scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(ctr)).flatten()  # (A*C,)
            keep = torch.nonzero(scores > score_threshold).flatten()
            if keep.numel() > candidates:
                keep = keep[scores[keep].topk(candidates).indices]
            loc, labels = keep // self.num_classes, keep % self.num_classes
            boxes = self.fcos.box_coder.decode(reg[loc], anchors[loc]).clamp(0.0, self.image_size)
            sc = scores[keep]
            wide = (boxes[:, 2] - boxes[:, 0] > 1e-3) & (boxes[:, 3] - boxes[:, 1] > 1e-3)
            boxes, sc, labels = boxes[wide], sc[wide], labels[wide]
            idx = (
                nms(boxes, sc, iou_threshold)
                if class_agnostic
                else batched_nms(boxes, sc, labels, iou_threshold)
            )
            idx = idx[:max_detections]
            results.append(Detections(boxes[idx], sc[idx], labels[idx]))
        return results


def _block_out_channels(block: nn.Module) -> int:
    last = getattr(block, "conv3", None) or block.conv2  # Bottleneck or BasicBlock
    assert isinstance(last, nn.Conv2d)
    return last.out_channels


def select_boxes(
    detections: list[Detections],
    num_boxes: int,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-K boxes per image -> padded ``(B,K,4)`` boxes, ``(B,K)`` validity mask and
    ``(B,K,C)`` box class scores (the detection's score at its class, 0 elsewhere)."""
    b = len(detections)
    boxes = torch.zeros(b, num_boxes, 4, device=device)
    mask = torch.zeros(b, num_boxes, dtype=torch.bool, device=device)
    scores = torch.zeros(b, num_boxes, num_classes, device=device)
    for i, det in enumerate(detections):
        n = min(num_boxes, det.boxes.shape[0])
        order = det.scores.argsort(descending=True, stable=True)[:n]
        boxes[i, :n] = det.boxes[order]
        mask[i, :n] = True
        scores[i, torch.arange(n, device=device), det.labels[order]] = det.scores[order].to(
            scores.dtype
        )
    return boxes, mask, scores


__all__ = ["Detections", "LesionDetector", "select_boxes"]
