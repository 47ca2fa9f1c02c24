"""D2R-Net: lesion detector, global/local visual encoder, memory-driven decoder.

Shapes use ``B`` batch, ``S`` image side, ``K`` boxes, ``N`` patch tokens,
``D`` visual dim, ``d`` decoder width, ``T`` tokens, ``V`` vocabulary,
``M`` memory slots, ``A`` detector locations, ``C`` classes.

Inference path (:class:`D2RNet`)::

    image (B,1,S,S) in [0,1] -> InputStem -> (B,3,S,S) ImageNet-normalised
      -> LesionDetector.dense  -> (B,A,C),(B,A,4),(B,A,1)  -> host: decode + NMS -> boxes
      -> VisualEncoder(image, boxes (B,K,4), box_mask (B,K), box_scores (B,K,C))
           -> tokens (B,N+K,D), mask
      -> ReportDecoder.encode -> (B,N+K,d) -> generate()/step() -> token ids

Training-time alignment losses (LAB, GAB and their text encoder) live in
:class:`AlignmentLosses`, which the inference path never builds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import batched_nms, nms
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from d2r_core.classes import CHEXPERT_OBSERVATIONS
from model.config import DETECTOR_STRIDES, NARROW_RESNET, ModelConfig
from model.errors import ModelError
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _NarrowResNet(torchvision.models.ResNet):  # type: ignore[misc]
    """torchvision ResNet with basic blocks and stage widths ``w, 2w, 4w, 8w``."""

    def __init__(self, layers: list[int], width: int, **kwargs: Any) -> None:
        self._width = width
        super().__init__(torchvision.models.resnet.BasicBlock, layers, **kwargs)
        self.fc = nn.Linear(8 * width, 1000)  # only ``fc.in_features`` is used

    def _make_layer(
        self,
        block: type[torchvision.models.resnet.BasicBlock | torchvision.models.resnet.Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        layer: nn.Sequential = super()._make_layer(
            block, planes * self._width // 64, blocks, stride, dilate
        )
        return layer


def _resnet(name: str, **kwargs: Any) -> torchvision.models.ResNet:
    """A randomly initialised ResNet: a torchvision name or ``resnet{10,18,34}_w{W}``."""
    m = NARROW_RESNET.fullmatch(name)
    if m is not None:
        layers = {"10": [1, 1, 1, 1], "18": [2, 2, 2, 2], "34": [3, 4, 6, 3]}[m.group(1)]
        return _NarrowResNet(layers, int(m.group(2)), **kwargs)
    model: torchvision.models.ResNet = getattr(torchvision.models, name)(weights=None, **kwargs)
    return model


class InputStem(nn.Module):
    """``(B,1,S,S)`` in [0, 1] -> ``(B,3,S,S)`` normalised with ImageNet mean/std."""

    mean: Tensor
    std: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        return (image.expand(-1, 3, -1, -1) - self.mean) / self.std


# --------------------------------------------------------------------------- detector


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
        trunk = _resnet(cfg.detector_backbone, norm_layer=nn.BatchNorm2d)
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


# --------------------------------------------------------------------------- global branch


class CPCA(nn.Module):
    """Channel-prior convolutional attention on a ``(B,C,H,W)`` map (same shape out).

    Channel attention (avg- and max-pooled descriptors through one shared MLP,
    sigmoids summed) re-weights channels; depthwise 5x5 plus strip-conv pairs
    (1x7/7x1, 1x11/11x1, 1x21/21x1), summed and mixed by a 1x1 conv, give a
    per-channel spatial attention map.
    """

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.GELU())
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
        )
        self.dw5 = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.strips = nn.ModuleList()
        for k in (7, 11, 21):
            self.strips.append(
                nn.Sequential(
                    nn.Conv2d(channels, channels, (1, k), padding=(0, k // 2), groups=channels),
                    nn.Conv2d(channels, channels, (k, 1), padding=(k // 2, 0), groups=channels),
                )
            )
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        # plain reductions, not adaptive_{avg,max}_pool2d: the same values, and torch < 2.14's
        # ONNX exporter has no conversion for adaptive_max_pool2d
        avg = x.mean(dim=(2, 3), keepdim=True)
        mx = x.amax(dim=(2, 3), keepdim=True)
        x = x * (torch.sigmoid(self.mlp(avg)) + torch.sigmoid(self.mlp(mx)))  # (B,C,H,W)
        base = self.dw5(x)
        spatial = base + sum((s(base) for s in self.strips), torch.zeros_like(base))
        out: Tensor = self.mix(self.mix(spatial) * x)
        return out


#: modules of the global trunk before its first ResNet stage (conv1, bn1, relu, maxpool)
_STEM_MODULES = 4

#: channels per grid cell of the global token's input
_SUMMARY_CHANNELS = 16


class GlobalBranch(nn.Module):
    """ResNet trunk + CPCA + bias-free 1x1 projection -> patch tokens ``(B,N,D)``.

    Each patch token carries a learned embedding of its grid position (stride 32), so the
    decoder can tell where a finding is (the patient's right from the left, apex from base).
    With ``global_token`` two tokens come first. The summary token maps the whole grid
    linearly: the trunk output reduced to a few channels by a 1x1 convolution, flattened (every
    cell at its place) and layer-normalised, so a finding with a typical place and little area,
    such as a tube in the trachea, shows in one token. The observation token embeds the
    probabilities of the 14 CheXpert observations that a linear head reads from the summary
    (trained on the report labels, see ``training.train``), as region tokens embed class scores.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        r = _resnet(cfg.global_backbone)
        self.trunk = nn.Sequential(
            r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4
        )
        channels = int(r.fc.in_features)
        self.cpca = CPCA(channels, cfg.cpca_reduction)
        self.proj = nn.Conv2d(channels, cfg.visual_dim, 1, bias=False)
        side = -(-cfg.image_size // 32)  # ResNet output stride
        self.positions = nn.Parameter(torch.zeros(1, side * side, cfg.visual_dim))
        nn.init.trunc_normal_(self.positions, std=0.02)
        self.summary: nn.Sequential | None = None
        if cfg.global_token:
            self.summary = nn.Sequential(
                nn.Conv2d(channels, _SUMMARY_CHANNELS, 1),
                nn.Flatten(),
                nn.LayerNorm(_SUMMARY_CHANNELS * side * side),
                nn.Linear(_SUMMARY_CHANNELS * side * side, cfg.visual_dim),
            )
            n = len(CHEXPERT_OBSERVATIONS)
            self.observations = nn.Linear(cfg.visual_dim, n)
            # unit scale, like the region tokens' class embeddings: a confident observation
            # stands out from the first step
            self.observation_embed = nn.Linear(n, cfg.visual_dim, bias=False)
            nn.init.normal_(self.observation_embed.weight, std=1.0)

    def load_trunk_weights(self, path: Path) -> None:
        """Load ResNet weights (torchvision key names, ``fc.*`` ignored) from a local file."""
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        remapped = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head in names:
                remapped[f"{names.index(head)}.{rest}"] = value
        missing, _ = self.trunk.load_state_dict(remapped, strict=False)
        if missing:
            raise ModelError(
                f"{path.name}: ResNet weights lack {len(missing)} keys, e.g. {missing[0]}"
            )

    def trunk_prefix(self, stages: int) -> nn.Sequential:
        """The stem and the first ``stages`` (0-4) ResNet stages of the trunk."""
        return self.trunk[: _STEM_MODULES + stages]

    def forward(
        self, x: Tensor, trunk_features: Tensor | None = None, trunk_stages: int = 4
    ) -> Tensor:
        """Normalised image -> ``(B,N,D)``. ``trunk_features``, the output of
        :meth:`trunk_prefix` (``trunk_stages``) for ``x`` computed earlier, replaces that part
        of the trunk (training with a partly frozen trunk)."""
        if trunk_features is None:
            f = self.trunk(x)
        else:
            f = self.trunk[_STEM_MODULES + trunk_stages :](trunk_features)
        patches: Tensor = self.proj(self.cpca(f)).flatten(2).transpose(1, 2) + self.positions
        if self.summary is None:
            return patches
        summary = self.summary(f)  # (B,D)
        seen = self.observation_embed(torch.sigmoid(self.observations(summary)))
        return torch.cat([summary[:, None], seen[:, None], patches], dim=1)


# --------------------------------------------------------------------------- local branch


def crop_boxes(image: Tensor, boxes: Tensor, crop_size: int) -> Tensor:
    """Batched crop-and-resize in the model frame, no loop over boxes.

    Each box is centred in a square window of side ``max(w, h)``; pixels of the
    window outside the box are zero (the crop is zero-padded to a square), then
    the window is resampled bilinearly to ``crop_size``. Each crop is normalised
    with its own in-box mean/std (std floor 0.01).

    Parameters
    ----------
    image : Tensor
        ``(B,1,S,S)`` model input in [0, 1].
    boxes : Tensor
        ``(B,K,4)`` xyxy model-frame boxes (padding boxes are any valid box).

    Returns
    -------
    Tensor
        ``(B*K,1,crop_size,crop_size)``.
    """
    b, k = boxes.shape[0], boxes.shape[1]
    size = image.shape[-1]
    x0, y0, x1, y1 = boxes.reshape(b * k, 4).unbind(-1)
    w = (x1 - x0).clamp(min=1.0)
    h = (y1 - y0).clamp(min=1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = torch.maximum(w, h)
    # pixel-centre offsets of the output grid in [-0.5, 0.5) of the window side
    t = (torch.arange(crop_size, dtype=image.dtype, device=image.device) + 0.5) / crop_size - 0.5
    gx = cx[:, None] + side[:, None] * t[None, :]  # (BK,c) frame x
    gy = cy[:, None] + side[:, None] * t[None, :]  # (BK,c) frame y
    grid = torch.stack(
        [
            (gx[:, None, :] * (2.0 / size) - 1.0).expand(-1, crop_size, -1),
            (gy[:, :, None] * (2.0 / size) - 1.0).expand(-1, -1, crop_size),
        ],
        dim=-1,
    )  # (BK,c,c,2)
    src = image.repeat_interleave(k, dim=0)  # (BK,1,S,S)
    crops = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = ((gx >= x0[:, None]) & (gx <= x1[:, None]))[:, None, :] & (
        (gy >= y0[:, None]) & (gy <= y1[:, None])
    )[:, :, None]  # (BK,c,c)
    inside_f = inside[:, None].to(crops.dtype)
    count = inside_f.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
    mean = (crops * inside_f).sum(dim=(2, 3), keepdim=True) / count
    var = (((crops - mean) * inside_f) ** 2).sum(dim=(2, 3), keepdim=True) / count
    std = var.clamp(min=1e-4).sqrt()  # = max(sqrt(var), 0.01), finite gradient at var 0
    return (crops - mean) / std * inside_f


class LERA(nn.Module):
    """Lesion region enhancement: ``x * (1 + channel_gate(x) * spatial_gate(x))``.

    Pixel space, 3 channels in and out. The spatial gate is a small conv net
    (3x3, dilated 3x3) ending in one sigmoid map; the channel gate is an MLP on
    the pooled crop. The residual form keeps the crop intact when gates are 0.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.spatial = nn.Sequential(
            nn.Conv2d(3, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )
        self.channel = nn.Sequential(
            nn.Linear(3, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 3)
        )

    def forward(self, x: Tensor) -> Tensor:  # (BK,3,c,c) -> (BK,3,c,c)
        spatial = torch.sigmoid(self.spatial(x))  # (BK,1,c,c)
        channel = torch.sigmoid(self.channel(x.mean(dim=(2, 3))))[:, :, None, None]  # (BK,3,1,1)
        return x * (1.0 + channel * spatial)


class CropCNN(nn.Module):
    """Five 3x3 conv+BN+ReLU stages (strides 1,2,2,2,2) + global average pool."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c_out in enumerate(channels):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (BK,3,c,c) -> (BK,D)
        out: Tensor = self.body(x)
        return out.mean(dim=(2, 3))


def box_geometry(values: Tensor, frequencies: int) -> Tensor:
    """``(..., 4)`` box centre and size (image fractions) -> the values followed by
    ``sin``/``cos`` of ``2 pi 2^k x`` for ``k < frequencies``: ``(..., 4 (1 + 2 frequencies))``.

    A few pixels of size or position then move the features by a visible amount, so the
    generator can tell a lobar consolidation from a smaller one, or the right from the left.
    """
    if frequencies == 0:
        return values
    scale = math.tau * 2.0 ** torch.arange(frequencies, dtype=values.dtype, device=values.device)
    angles = (values[..., None] * scale).flatten(-2)  # (..., 4F)
    return torch.cat([values, angles.sin(), angles.cos()], dim=-1)


class LocalBranch(nn.Module):
    """Lesion crops -> LERA -> crop CNN, plus what the detector says of each box -> region
    tokens ``(B,K,D)``.

    A region token is the sum of three parts: the crop's appearance (LERA + crop CNN), the
    detector's class scores of the box (a bias-free linear map of the ``(C,)`` score vector,
    so a low-confidence box says less), and the box geometry (centre, width and height as
    fractions of the image, with sines and cosines of them at ``geometry_frequencies``
    octaves, through a small MLP; it carries laterality, zone and size).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.crop_size = cfg.crop_size
        self.lera = LERA(cfg.lera_hidden)
        self.cnn = CropCNN(cfg.crop_channels)
        d = cfg.visual_dim
        self.classes = nn.Linear(cfg.num_classes, d, bias=False)
        # one embedding per class at unit scale (as nn.Embedding starts), so that a confident
        # detection stands out of the crop features from the first step
        nn.init.normal_(self.classes.weight, std=1.0)
        self.frequencies = cfg.geometry_frequencies
        width = 4 * (1 + 2 * self.frequencies)
        self.geometry = nn.Sequential(nn.Linear(width, d), nn.ReLU(inplace=True), nn.Linear(d, d))

    def forward(self, image: Tensor, boxes: Tensor, box_mask: Tensor, box_scores: Tensor) -> Tensor:
        b, k = boxes.shape[0], boxes.shape[1]
        size = float(image.shape[-1])
        full = torch.tensor([0.0, 0.0, size, size], dtype=boxes.dtype, device=boxes.device)
        safe = torch.where(box_mask[..., None], boxes, full)  # padding boxes never yield NaN
        crops = crop_boxes(image, safe, self.crop_size).expand(-1, 3, -1, -1)  # (BK,3,c,c)
        appearance = self.cnn(self.lera(crops)).reshape(b, k, -1)  # (B,K,D)
        x0, y0, x1, y1 = (safe / size).unbind(-1)
        geometry = box_geometry(
            torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1), self.frequencies
        )
        tokens: Tensor = appearance + self.classes(box_scores) + self.geometry(geometry)
        return tokens  # (B,K,D)


@dataclass(frozen=True)
class VisualFeatures:
    """Outputs of :class:`VisualEncoder`."""

    patches: Tensor  # (B,N,D)
    regions: Tensor  # (B,K,D)
    region_mask: Tensor  # (B,K) True = real box

    @property
    def tokens(self) -> Tensor:  # (B,N+K,D)
        return torch.cat([self.patches, self.regions], dim=1)

    @property
    def mask(self) -> Tensor:  # (B,N+K) True = attend
        ones = torch.ones(self.patches.shape[:2], dtype=torch.bool, device=self.patches.device)
        return torch.cat([ones, self.region_mask], dim=1)

    @property
    def mean(self) -> Tensor:  # (B,D) the global (mean patch) token
        return self.patches.mean(dim=1)


class VisualEncoder(nn.Module):
    """Global + local branches -> patch and region tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.global_branch = GlobalBranch(cfg)
        self.local_branch = LocalBranch(cfg)

    def forward(
        self,
        image: Tensor,
        normalised: Tensor,
        boxes: Tensor,
        box_mask: Tensor,
        box_scores: Tensor,
        trunk_features: Tensor | None = None,
        trunk_stages: int = 4,
    ) -> VisualFeatures:
        return VisualFeatures(
            self.global_branch(normalised, trunk_features, trunk_stages),
            self.local_branch(image, boxes, box_mask, box_scores),
            box_mask,
        )


# --------------------------------------------------------------------------- decoder


class Attention(nn.Module):
    """Multi-head scaled dot-product attention; ``mask`` True = may attend."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dk = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def forward(self, query: Tensor, kv: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.attend(query, self.k(kv), self.v(kv), mask)

    def attend(
        self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """:meth:`forward` with the key and value projections ``(B,Tk,d)`` already applied
        (a decoder's cache holds them)."""
        b, tq, _ = query.shape
        tk = keys.shape[1]
        q = self.q(query).view(b, tq, self.heads, self.dk).transpose(1, 2)  # (B,h,Tq,dk)
        k = keys.view(b, tk, self.heads, self.dk).transpose(1, 2)
        v = values.view(b, tk, self.heads, self.dk).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.dk)  # (B,h,Tq,Tk)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        attn = self.drop(torch.softmax(scores, dim=-1))
        out: Tensor = self.o((attn @ v).transpose(1, 2).reshape(b, tq, -1))
        return out


class FeedForward(nn.Sequential):
    def __init__(self, d: int, d_ff: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(d, d_ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(d_ff, d)
        )


class RelationalMemory(nn.Module):
    """R2Gen-style relational memory: ``M`` slots updated once per input token.

    ``M' = gate_i * tanh(MLP(M + Attn(M, [M; y]))) + gate_f * M`` with input and
    forget gates computed from the token ``y`` and ``tanh(M)``.
    """

    def __init__(self, d: int, slots: int, heads: int) -> None:
        super().__init__()
        self.d, self.slots = d, slots
        self.attn = Attention(d, heads, 0.0)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d))
        self.w_gate = nn.Linear(d, 2 * d)
        self.u_gate = nn.Linear(d, 2 * d)

    def initial(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """Identity-like initial memory ``(B,M,d)``."""
        return torch.eye(self.slots, self.d, device=device).expand(batch, -1, -1).contiguous()

    def forward(self, memory: Tensor, y: Tensor) -> Tensor:
        """One update: memory ``(B,M,d)``, token embedding ``(B,d)`` -> ``(B,M,d)``."""
        kv = torch.cat([memory, y[:, None, :]], dim=1)  # (B,M+1,d)
        nxt = memory + self.attn(memory, kv)
        nxt = nxt + self.mlp(nxt)
        gates = self.w_gate(y)[:, None, :] + self.u_gate(torch.tanh(memory))  # (B,M,2d)
        i, f = gates.chunk(2, dim=-1)
        return torch.sigmoid(i) * torch.tanh(nxt) + torch.sigmoid(f) * memory


class MCLN(nn.Module):
    """Memory-driven conditional layer norm: gamma/beta shifted by an MLP of the memory."""

    def __init__(self, d: int, memory_dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d))
        self.beta = nn.Parameter(torch.zeros(d))
        self.d_gamma = nn.Sequential(
            nn.Linear(memory_dim, d), nn.ReLU(inplace=True), nn.Linear(d, d)
        )
        self.d_beta = nn.Sequential(
            nn.Linear(memory_dim, d), nn.ReLU(inplace=True), nn.Linear(d, d)
        )
        for mlp in (self.d_gamma, self.d_beta):
            last = mlp[2]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:  # x (B,T,d), memory (B,T,M*d)
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        out: Tensor = x * (self.gamma + self.d_gamma(memory)) + self.beta + self.d_beta(memory)
        return out


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer over visual tokens (no positions)."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, heads, dropout)
        self.ff = FeedForward(d, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x (B,L,d), mask (B,1,1,L)
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, mask))
        out: Tensor = x + self.drop(self.ff(self.ln2(x)))
        return out


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer whose three norms are MCLN."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float, memory_dim: int) -> None:
        super().__init__()
        self.n1, self.n2, self.n3 = (MCLN(d, memory_dim) for _ in range(3))
        self.self_attn = Attention(d, heads, dropout)
        self.cross_attn = Attention(d, heads, dropout)
        self.ff = FeedForward(d, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, memory: Tensor, causal: Tensor, enc: Tensor, enc_mask: Tensor
    ) -> Tensor:
        h = self.n1(x, memory)
        x = x + self.drop(self.self_attn(h, h, causal))
        x = x + self.drop(self.cross_attn(self.n2(x, memory), enc, enc_mask))
        out: Tensor = x + self.drop(self.ff(self.n3(x, memory)))
        return out

    def step(
        self,
        x: Tensor,
        memory: Tensor,
        past_keys: Tensor,
        past_values: Tensor,
        cross_keys: Tensor,
        cross_values: Tensor,
        enc_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` of one new position ``(B,1,d)`` given the self-attention keys and
        values of the earlier ones ``(B,P,d)`` and the cross-attention keys and values of the
        encoder states ``(B,L,d)``; returns its output and its own key and value.

        Earlier positions never attend to later ones, so their keys and values do not change
        once computed: each step projects only the new position.
        """
        h = self.n1(x, memory)
        key, value = self.self_attn.k(h), self.self_attn.v(h)  # (B,1,d)
        keys = torch.cat([past_keys, key], dim=1)
        values = torch.cat([past_values, value], dim=1)
        x = x + self.drop(self.self_attn.attend(h, keys, values))
        x = x + self.drop(
            self.cross_attn.attend(self.n2(x, memory), cross_keys, cross_values, enc_mask)
        )
        out: Tensor = x + self.drop(self.ff(self.n3(x, memory)))
        return out, key, value


def sinusoid_positions(length: int, d: int) -> Tensor:
    """Standard sinusoidal position table ``(length, d)``."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(length, d)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : d // 2]
    return table


class ReportDecoder(nn.Module):
    """Memory-driven transformer (R2Gen design): visual encoder + MCLN decoder."""

    positions: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= SEP_ID:
            raise ModelError(f"vocab_size: must exceed the special tokens, got {cfg.vocab_size}")
        d = cfg.d_model
        self.d, self.slots = d, cfg.memory_slots
        self.visual_proj = nn.Sequential(
            nn.Linear(cfg.visual_dim, d), nn.ReLU(inplace=True), nn.Dropout(cfg.visual_dropout)
        )
        self.encoder = nn.ModuleList(
            EncoderLayer(d, cfg.num_heads, cfg.d_ff, cfg.dropout)
            for _ in range(cfg.num_encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.embed = nn.Embedding(cfg.vocab_size, d, padding_idx=PAD_ID)
        self.register_buffer(
            "positions", sinusoid_positions(cfg.max_tokens + 1, d), persistent=False
        )
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.context = nn.Linear(d, d)
        self.memory = RelationalMemory(d, cfg.memory_slots, cfg.num_heads)
        mem_dim = d * cfg.memory_slots
        self.layers = nn.ModuleList(
            DecoderLayer(d, cfg.num_heads, cfg.d_ff, cfg.dropout, mem_dim)
            for _ in range(cfg.num_decoder_layers)
        )
        self.final_norm = MCLN(d, mem_dim)
        self.out = nn.Linear(d, cfg.vocab_size)

    def encode(self, visual: Tensor, mask: Tensor) -> Tensor:
        """Visual tokens ``(B,L,D)`` + mask ``(B,L)`` -> encoder states ``(B,L,d)``."""
        x = self.visual_proj(visual)
        m = mask[:, None, None, :]
        for layer in self.encoder:
            x = layer(x, m)
        out: Tensor = self.encoder_norm(x)
        return out

    def visual_context(self, enc: Tensor, enc_mask: Tensor) -> Tensor:
        """Encoder states ``(B,L,d)`` -> one context vector per image ``(B,1,d)``.

        A masked max over the visual tokens (what is present anywhere: a region token with a
        confident class dominates its features) through a linear map. It is added to every
        token embedding, so the image reaches the relational memory and every MCLN directly,
        not only through cross-attention.
        """
        pooled = enc.masked_fill(~enc_mask[..., None], torch.finfo(enc.dtype).min).amax(dim=1)
        out: Tensor = self.context(pooled)[:, None, :]
        return out

    def embed_tokens(self, tokens: Tensor, context: Tensor, start: int = 0) -> Tensor:
        """Token ids ``(B,T)`` at positions ``start``.. -> scaled embeddings + positions +
        visual context ``(B,T,d)``."""
        t = tokens.shape[1]
        emb = self.embed(tokens) * math.sqrt(self.d) + self.positions[start : start + t] + context
        out: Tensor = self.embed_drop(emb)
        return out

    def _decode(self, emb: Tensor, memory: Tensor, enc: Tensor, enc_mask: Tensor) -> Tensor:
        t = emb.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=emb.device).tril()[None, None]
        m = enc_mask[:, None, None, :]
        x = emb
        for layer in self.layers:
            x = layer(x, memory, causal, enc, m)
        return torch.log_softmax(self.out(self.final_norm(x, memory)), dim=-1)  # (B,T,V)

    def forward(self, enc: Tensor, enc_mask: Tensor, tokens: Tensor) -> Tensor:
        """Teacher forcing: input ids ``(B,T)`` -> next-token log-probs ``(B,T,V)``."""
        emb = self.embed_tokens(tokens, self.visual_context(enc, enc_mask))
        mem = self.memory.initial(tokens.shape[0], tokens.device)
        states = []
        for i in range(tokens.shape[1]):  # relational memory is sequential by design
            mem = self.memory(mem, emb[:, i])
            states.append(mem.flatten(1))
        return self._decode(emb, torch.stack(states, dim=1), enc, enc_mask)

    def prepare(self, enc: Tensor, enc_mask: Tensor) -> tuple[Tensor, Tensor]:
        """What every decoding step reads of the image, computed once per image: the visual
        context ``(B,1,d)`` and the cross-attention keys and values of the encoder states in
        each decoder layer ``(B,2N,L,d)`` (layer ``i``: keys at ``2i``, values at ``2i+1``)."""
        projections = []
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            projections += [layer.cross_attn.k(enc), layer.cross_attn.v(enc)]
        return self.visual_context(enc, enc_mask), torch.stack(projections, dim=1)

    def initial_state(
        self, batch: int, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """Decoder state before the first token: the initial relational memory ``(B,M,d)``
        and an empty cache ``(B,2N,0,d)`` (see :meth:`step`)."""
        cache = torch.zeros(batch, 2 * len(self.layers), 0, self.d, device=device)
        return self.memory.initial(batch, device), cache

    def step(
        self,
        tokens: Tensor,
        memory: Tensor,
        cache: Tensor,
        context: Tensor,
        cross: Tensor,
        enc_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One decoding step with the decoder state explicit (exportable).

        Parameters
        ----------
        tokens : Tensor
            ``(B,1)``: the newest id (BOS at the first step).
        memory : Tensor
            ``(B,M,d)``: the relational memory before consuming it.
        cache : Tensor
            ``(B,2N,P,d)``: the self-attention keys and values of the ``P`` earlier positions
            in each of the ``N`` decoder layers (layer ``i``: keys at ``2i``, values at
            ``2i+1``); ``P`` = 0 at the first step (:meth:`initial_state`).
        context, cross, enc_mask : Tensor
            The image, from :meth:`prepare`, and the encoder mask ``(B,L)``.

        Returns
        -------
        tuple of Tensor
            Log-probs of the next token ``(B,V)``, the memory after the token ``(B,M,d)``
            and the new position's keys and values ``(B,2N,1,d)`` (append them to
            ``cache`` along dimension 2 for the next step).
        """
        emb = self.embed_tokens(tokens, context, start=cache.shape[2])  # (B,1,d)
        new = self.memory(memory, emb[:, 0])  # (B,M,d)
        after = new.flatten(1)[:, None]  # (B,1,M*d): MCLN conditions on the memory after it
        m = enc_mask[:, None, None, :]
        x = emb
        entries = []
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            x, key, value = layer.step(
                x,
                after,
                cache[:, 2 * i],
                cache[:, 2 * i + 1],
                cross[:, 2 * i],
                cross[:, 2 * i + 1],
                m,
            )
            entries += [key, value]
        logits = self.out(self.final_norm(x, after))[:, 0]  # (B,V)
        return torch.log_softmax(logits, dim=-1), new, torch.stack(entries, dim=1)


# --------------------------------------------------------------------------- generation


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


# --------------------------------------------------------------------------- full model


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
        """Patch and region tokens (training); ``trunk_features`` as in :class:`GlobalBranch`."""
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


def lm_loss(logprobs: Tensor, tokens: Tensor) -> Tensor:
    """Mean NLL of ``tokens[:, 1:]`` over non-PAD positions."""
    target = tokens[:, 1:]
    nll = -logprobs.gather(-1, target[..., None]).squeeze(-1)
    keep = (target != PAD_ID).to(nll.dtype)
    return (nll * keep).sum() / keep.sum().clamp(min=1.0)


# --------------------------------------------------------------------------- alignment (training)


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
            From :meth:`D2RNet.visual_features`.
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


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "CPCA",
    "LERA",
    "AlignmentLosses",
    "D2RNet",
    "Detections",
    "LesionDetector",
    "ReportDecoder",
    "VisualFeatures",
    "Hypothesis",
    "beam_hypotheses",
    "beam_search",
    "count_parameters",
    "crop_boxes",
    "cross_attention_similarity",
    "lm_loss",
    "ranking_loss",
    "select_boxes",
]
