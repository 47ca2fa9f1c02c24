"""``ModelConfig``: every architecture and decoding setting of D2R-Net.

The config is serialised into each checkpoint (``config.json``) with
:meth:`ModelConfig.to_dict` and read back with :meth:`ModelConfig.from_dict`,
which names the offending field on any error.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from model.errors import ModelConfigError

RESNET_NAMES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

#: narrow ResNets ``resnet{10,18,34}_w{W}``: basic blocks, stage widths W, 2W, 4W, 8W (W a
#: multiple of 8); e.g. ``resnet18_w32`` has a quarter of ResNet-18's parameters
NARROW_RESNET = re.compile(r"resnet(10|18|34)_w([1-9][0-9]*)")


def is_backbone_name(name: str) -> bool:
    """Whether ``name`` is a torchvision ResNet name or a narrow ``resnetD_wW`` variant."""
    if name in RESNET_NAMES:
        return True
    m = NARROW_RESNET.fullmatch(name)
    return m is not None and int(m.group(2)) % 8 == 0


#: detector feature-map strides (FPN P3..P7); the image size must be a multiple of the last
DETECTOR_STRIDES: tuple[int, ...] = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, box selection and decoding settings of one D2R-Net model.

    Parameters
    ----------
    preset : str
        Name of the preset the config derives from (informational).
    image_size : int
        Side of the square letterboxed model input, pixels; multiple of 128.
    vocab_size : int
        Number of token ids (special tokens included); 0 until a vocabulary is attached.
    global_backbone : str
        torchvision ResNet name of the global branch.
    visual_dim : int
        Dimension of patch and region tokens.
    cpca_reduction : int
        Channel-attention MLP reduction of the CPCA block.
    global_token : bool
        Put one more token before the patch tokens: a linear map of the whole global-trunk
        grid (reduced to a few channels per cell), for small findings at typical places.
    detector_backbone : str
        torchvision ResNet name of the FCOS detector backbone.
    detector_fpn_channels, detector_head_convs : int
        FPN width and number of conv layers per FCOS head tower.
    num_classes : int
        Detector classes (the 22 VinDr-CXR local labels).
    num_boxes : int
        K, the number of lesion boxes fed to the generator.
    box_score_threshold, box_nms_iou : float
        Generator box selection: score floor and class-agnostic NMS IoU.
    lesion_score_threshold, lesion_nms_iou : float
        Reported lesions: score floor and per-class NMS IoU.
    max_lesions : int
        Maximum reported lesions per image.
    crop_size : int
        Side of each lesion crop fed to LERA and the crop CNN.
    geometry_frequencies : int
        Sine/cosine frequencies (1, 2, 4, ... cycles per image side) added to each box's centre
        and size in the region token's geometry input; 0 feeds the four raw values only (the
        default of checkpoints that predate the option).
    crop_channels : tuple of int
        Output channels of the five crop-CNN stages; the last equals ``visual_dim``.
    lera_hidden : int
        Hidden channels of the LERA spatial and channel gates.
    d_model, num_encoder_layers, num_decoder_layers, num_heads, d_ff : int
        Memory-driven transformer sizes.
    dropout, visual_dropout : float
        Transformer dropout and the dropout after the visual projection.
    memory_slots : int
        Relational-memory slots.
    beam_size, max_tokens : int
        Beam width and maximum sequence length (BOS and EOS included).
    no_repeat_trigram : bool
        Forbid repeating a word trigram during generation.
    lm_weight, lab_weight, gab_weight : float
        Training loss weights (language model, local and global alignment).
    align_margin, align_temperature : float
        Hinge ranking margin and attention softmax temperature of LAB/GAB.
    """

    preset: str
    image_size: int
    vocab_size: int = 0
    global_backbone: str = "resnet101"
    visual_dim: int = 1024
    cpca_reduction: int = 4
    global_token: bool = False
    detector_backbone: str = "resnet50"
    detector_fpn_channels: int = 256
    detector_head_convs: int = 4
    num_classes: int = 22
    num_boxes: int = 6
    box_score_threshold: float = 0.05
    box_nms_iou: float = 0.5
    lesion_score_threshold: float = 0.3
    lesion_nms_iou: float = 0.5
    max_lesions: int = 20
    crop_size: int = 384
    geometry_frequencies: int = 0
    crop_channels: tuple[int, ...] = (64, 128, 256, 512, 1024)
    lera_hidden: int = 16
    d_model: int = 512
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    num_heads: int = 8
    d_ff: int = 512
    dropout: float = 0.1
    visual_dropout: float = 0.5
    memory_slots: int = 3
    beam_size: int = 3
    max_tokens: int = 100
    no_repeat_trigram: bool = False
    lm_weight: float = 1.0
    lab_weight: float = 1.0
    gab_weight: float = 1.0
    align_margin: float = 0.2
    align_temperature: float = 20.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": float, "str": str, "bool": bool}.get(str(f.type))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                continue
            if expected is not None and (
                not isinstance(value, expected) or (expected is int and isinstance(value, bool))
            ):
                raise ModelConfigError(
                    f"{f.name}: expected {expected.__name__}, got {type(value).__name__}"
                )
        if not isinstance(self.crop_channels, tuple) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.crop_channels
        ):
            raise ModelConfigError("crop_channels: expected a tuple of positive ints")
        self._check()

    # Longer than a screen: one validation line per configuration field
    def _check(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ModelConfigError(f"{name}: {what}, got {getattr(self, name)!r}")

        need(
            self.image_size > 0 and self.image_size % DETECTOR_STRIDES[-1] == 0,
            "image_size",
            f"must be a positive multiple of {DETECTOR_STRIDES[-1]}",
        )
        need(self.vocab_size >= 0, "vocab_size", "must be >= 0")
        need(
            is_backbone_name(self.global_backbone),
            "global_backbone",
            f"must be one of {RESNET_NAMES} or resnet{{10,18,34}}_w<multiple of 8>",
        )
        need(
            is_backbone_name(self.detector_backbone),
            "detector_backbone",
            f"must be one of {RESNET_NAMES} or resnet{{10,18,34}}_w<multiple of 8>",
        )
        for name in (
            "visual_dim",
            "cpca_reduction",
            "num_classes",
            "num_boxes",
            "crop_size",
            "lera_hidden",
            "d_model",
            "num_encoder_layers",
            "num_decoder_layers",
            "num_heads",
            "d_ff",
            "memory_slots",
            "beam_size",
            "max_lesions",
            "detector_head_convs",
        ):
            need(getattr(self, name) > 0, name, "must be > 0")
        need(
            self.detector_fpn_channels > 0 and self.detector_fpn_channels % 32 == 0,
            "detector_fpn_channels",
            "must be a positive multiple of 32 (GroupNorm)",
        )
        need(self.visual_dim % self.cpca_reduction == 0, "cpca_reduction", "must divide visual_dim")
        need(len(self.crop_channels) == 5, "crop_channels", "must have 5 stages")
        need(
            self.crop_channels[-1] == self.visual_dim,
            "crop_channels",
            "last stage must equal visual_dim",
        )
        need(self.d_model % self.num_heads == 0, "num_heads", "must divide d_model")
        need(self.memory_slots <= self.d_model, "memory_slots", "must be <= d_model")
        need(0 <= self.geometry_frequencies <= 12, "geometry_frequencies", "must be in 0..12")
        need(self.max_tokens >= 4, "max_tokens", "must be >= 4")
        for name in (
            "box_score_threshold",
            "lesion_score_threshold",
            "box_nms_iou",
            "lesion_nms_iou",
            "dropout",
            "visual_dropout",
        ):
            need(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        for name in ("lm_weight", "lab_weight", "gab_weight", "align_margin"):
            need(getattr(self, name) >= 0.0, name, "must be >= 0")
        need(self.align_temperature > 0.0, "align_temperature", "must be > 0")

    def replace(self, **changes: Any) -> ModelConfig:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable mapping of every field."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from :meth:`to_dict` output; errors name the bad field."""
        if not isinstance(data, dict):
            raise ModelConfigError(f"config: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelConfigError(f"{unknown[0]}: unknown config field")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        for name in required:
            if name not in data:
                raise ModelConfigError(f"{name}: missing config field")
        values = dict(data)
        if "crop_channels" in values:
            if not isinstance(values["crop_channels"], list | tuple):
                raise ModelConfigError("crop_channels: expected a list of ints")
            values["crop_channels"] = tuple(values["crop_channels"])
        return cls(**values)


PAPER = ModelConfig(preset="paper", image_size=384, geometry_frequencies=6)

#: ``small`` uses narrow ResNets (detector ResNet-18 at width 32, global branch ResNet-10 at
#: width 32): about 6 M parameters, so a trained fp32 checkpoint stays under 30 MB and trains
#: on a CPU; ``paper`` is unchanged.
SMALL = ModelConfig(
    preset="small",
    image_size=256,
    global_backbone="resnet10_w32",
    visual_dim=128,
    detector_backbone="resnet18_w32",
    detector_fpn_channels=64,
    detector_head_convs=2,
    num_boxes=4,
    crop_size=64,
    geometry_frequencies=6,
    crop_channels=(16, 32, 64, 96, 128),
    lera_hidden=8,
    d_model=128,
    num_encoder_layers=1,
    num_decoder_layers=1,
    num_heads=4,
    d_ff=256,
    beam_size=3,
    max_tokens=60,
)

PRESETS: dict[str, ModelConfig] = {"paper": PAPER, "small": SMALL}


def get_preset(name: str) -> ModelConfig:
    """Return the preset called ``name`` (``paper`` or ``small``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelConfigError(
            f"preset: unknown preset {name!r}, expected one of {sorted(PRESETS)}"
        ) from None


__all__ = [
    "DETECTOR_STRIDES",
    "PAPER",
    "PRESETS",
    "NARROW_RESNET",
    "RESNET_NAMES",
    "SMALL",
    "ModelConfig",
    "get_preset",
    "is_backbone_name",
]
