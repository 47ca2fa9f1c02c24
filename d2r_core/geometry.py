"""Boxes in image pixels.

>>> iou((0, 0, 10, 10), (5, 0, 15, 10))
0.3333333333333333
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Box", "iou"]

#: ``(x_min, y_min, x_max, y_max)`` in pixels of the source image
Box = tuple[float, float, float, float]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x_min, y_min, x_max, y_max)`` boxes (0 when disjoint)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
