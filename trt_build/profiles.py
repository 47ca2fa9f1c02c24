"""Optimisation profiles for the dynamic dimensions of the exported graphs (pure).

The exported graphs (``export.json``) have two symbolic dimensions: ``batch`` and, in the
decoder step's cache, ``past`` (positions decoded so far, 0 at the first step). The detector
and visual graphs see one row per image; the decoder step sees one row per beam, so its batch
range is ``beam_size`` times larger.

>>> graphs = {"detector": {"inputs": [{"name": "image", "shape": ["batch", 1, 256, 256]}]}}
>>> compute_profiles(graphs, max_batch=4, beam_size=3, max_tokens=60)["detector"]["image"]
{'min': [1, 1, 256, 256], 'opt': [1, 1, 256, 256], 'max': [4, 1, 256, 256]}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trt_build.errors import ProfileError

#: the largest batch the ONNX export accepts (``torch.export.Dim("batch", max=64)``)
EXPORT_MAX_BATCH = 64
DECODER_PART = "decoder_step"

Shapes = dict[str, list[int]]


def dimension_ranges(
    part: str, *, max_batch: int, beam_size: int, max_tokens: int
) -> dict[str, tuple[int, int, int]]:
    """``(min, opt, max)`` of each symbolic dimension for one graph."""
    if max_batch < 1:
        raise ProfileError(f"max_batch: must be at least 1, got {max_batch}")
    if beam_size < 1 or max_tokens < 2:
        raise ProfileError(f"beam_size/max_tokens: got {beam_size}/{max_tokens}")
    if part == DECODER_PART:
        rows = max_batch * beam_size
        if rows > EXPORT_MAX_BATCH:
            raise ProfileError(
                f"max_batch: {max_batch} x beam {beam_size} = {rows} decoder rows exceeds "
                f"the exported limit {EXPORT_MAX_BATCH}"
            )
        # ``past``: positions already in the decoder's cache, none at the first step and
        # max_tokens - 2 at the last (BOS and max_tokens - 2 generated ids before it)
        return {
            "batch": (1, beam_size, rows),
            "past": (0, max_tokens // 2, max_tokens - 2),
        }
    if max_batch > EXPORT_MAX_BATCH:
        raise ProfileError(f"max_batch: {max_batch} exceeds the exported limit {EXPORT_MAX_BATCH}")
    return {"batch": (1, 1, max_batch)}


def compute_profiles(
    graphs: Mapping[str, Any], *, max_batch: int, beam_size: int, max_tokens: int
) -> dict[str, dict[str, Shapes]]:
    """Graph -> input -> ``{"min", "opt", "max"}`` shapes, from ``export.json``'s graphs."""
    out: dict[str, dict[str, Shapes]] = {}
    for part, info in graphs.items():
        ranges = dimension_ranges(
            part, max_batch=max_batch, beam_size=beam_size, max_tokens=max_tokens
        )
        shapes: dict[str, Shapes] = {}
        for value in info["inputs"]:
            trio: Shapes = {"min": [], "opt": [], "max": []}
            for dim in value["shape"]:
                if isinstance(dim, str):
                    if dim not in ranges:
                        raise ProfileError(
                            f"{part}.{value['name']}: unknown dynamic dimension {dim!r}"
                        )
                    lo, opt, hi = ranges[dim]
                elif isinstance(dim, int) and dim > 0:
                    lo = opt = hi = dim
                else:
                    raise ProfileError(f"{part}.{value['name']}: bad dimension {dim!r}")
                trio["min"].append(lo)
                trio["opt"].append(opt)
                trio["max"].append(hi)
            shapes[value["name"]] = trio
        out[part] = shapes
    return out


__all__ = ["EXPORT_MAX_BATCH", "compute_profiles", "dimension_ranges"]
