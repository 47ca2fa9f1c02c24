"""The visual encoder: a global branch over the whole image and a local branch over lesion boxes.

Shapes use ``B`` batch, ``S`` image side, ``K`` boxes, ``N`` patch tokens, ``D`` visual dim and
``C`` classes. The global branch (ResNet trunk, CPCA, position embedding) gives patch tokens
``(B,N,D)`` (with ``global_token``, a summary and an observation token first); the local branch
crops each detected box, enhances it with LERA and embeds it with a small CNN, its class scores
and its geometry into region tokens ``(B,K,D)``. :class:`VisualEncoder` runs both and returns
them as :class:`VisualFeatures`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2r_core.classes import CHEXPERT_OBSERVATIONS
from model.backbone import build_resnet
from model.config import ModelConfig
from model.errors import ModelError

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
        r = build_resnet(cfg.global_backbone)
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


__all__ = [
    "CPCA",
    "LERA",
    "CropCNN",
    "GlobalBranch",
    "LocalBranch",
    "VisualEncoder",
    "VisualFeatures",
    "box_geometry",
    "crop_boxes",
]
