"""Image input and ResNet trunks shared by the detector and the global branch.

:class:`InputStem` turns the one-channel model input into the ImageNet-normalised three-channel
image both trunks read; :func:`build_resnet` builds a randomly initialised torchvision ResNet,
including the narrow ``resnet{10,18,34}_w{W}`` variants of the ``small`` preset.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from model.config import NARROW_RESNET

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


def build_resnet(name: str, **kwargs: Any) -> torchvision.models.ResNet:
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


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "InputStem", "build_resnet"]
