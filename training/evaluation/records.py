"""Prediction records (JSON Lines) for ``d2r evaluate``: parsing with per-line errors."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2r_core.classes import VINDR_CLASSES
from d2r_core.geometry import Box
from training.errors import EvaluationInputError


@dataclass(frozen=True)
class LesionRecord:
    """One box: class name, score (1.0 for ground truth) and ``[x_min, y_min, x_max, y_max]``."""

    class_name: str
    box: Box
    score: float = 1.0


@dataclass(frozen=True)
class EvalRecord:
    """One study to score."""

    id: str
    reference: str
    generated: str
    gt_lesions: tuple[LesionRecord, ...] | None = None
    pred_lesions: tuple[LesionRecord, ...] | None = None
    #: the model's input gate declined the study (not scored; counted in ``abstain_rate``)
    abstained: bool = False
    #: reference finding sentences, each as the indices of its boxes in ``gt_lesions``
    gt_sentences: tuple[tuple[int, ...], ...] | None = None
    #: (columns, rows) of the image the boxes refer to (needed for grounding)
    image_size: tuple[int, int] | None = None


def _lesions(value: Any, *, scored: bool, key: str) -> tuple[LesionRecord, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list")
    out = []
    for j, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ValueError(f"{key}[{j}] must be an object")
        name = item.get("class_name")
        if name not in VINDR_CLASSES:
            raise ValueError(f"{key}[{j}].class_name {name!r} is not a VinDr-CXR class")
        box = item.get("box")
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in box)
            or box[2] < box[0]
            or box[3] < box[1]
        ):
            raise ValueError(f"{key}[{j}].box must be [x_min, y_min, x_max, y_max] numbers")
        score = item.get("score", 1.0 if not scored else None)
        if not isinstance(score, int | float) or not 0.0 <= score <= 1.0:
            raise ValueError(f"{key}[{j}].score must be a number in [0, 1]")
        out.append(
            LesionRecord(
                str(name),
                (float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                float(score),
            )
        )
    return tuple(out)


def record_from_dict(obj: Any) -> EvalRecord:
    """Validate one decoded object; raise ``ValueError`` naming the first problem."""
    if not isinstance(obj, Mapping):
        raise ValueError("not a JSON object")
    for key in ("id", "reference"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise ValueError(f"{key} must be a non-empty string")
    if not isinstance(obj.get("generated"), str):
        raise ValueError("generated must be a string (may be empty)")
    gt = (
        _lesions(obj["gt_lesions"], scored=False, key="gt_lesions") if "gt_lesions" in obj else None
    )
    pred = (
        _lesions(obj["pred_lesions"], scored=True, key="pred_lesions")
        if "pred_lesions" in obj
        else None
    )
    abstained = obj.get("abstained", False)
    if not isinstance(abstained, bool):
        raise ValueError("abstained must be true or false")
    gt_sentences = None
    if "gt_sentences" in obj:
        gt_sentences = _sentences(obj["gt_sentences"], len(gt or ()))
    image_size = None
    if "columns" in obj or "rows" in obj:
        columns, rows = obj.get("columns"), obj.get("rows")
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (columns, rows)
        ):
            raise ValueError("columns and rows must be positive integers")
        image_size = (int(columns), int(rows))  # type: ignore[arg-type]
    return EvalRecord(
        obj["id"],
        obj["reference"],
        obj["generated"],
        gt,
        pred,
        abstained,
        gt_sentences,
        image_size,
    )


def _sentences(value: Any, n_lesions: int) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list):
        raise ValueError("gt_sentences must be a list")
    out = []
    for j, item in enumerate(value):
        lesions = item.get("lesions") if isinstance(item, Mapping) else None
        if not isinstance(lesions, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_lesions for i in lesions
        ):
            raise ValueError(f"gt_sentences[{j}].lesions must be indices into gt_lesions")
        out.append(tuple(lesions))
    return tuple(out)


def parse_records(lines: Iterable[str]) -> list[EvalRecord]:
    """Parse JSON Lines; raise :class:`EvaluationInputError` listing every bad line by number."""
    records: list[EvalRecord] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = record_from_dict(json.loads(line))
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not valid JSON ({exc.msg})")
            continue
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        if rec.id in seen:
            problems.append(
                f"line {number}: duplicate id {rec.id!r} (first on line {seen[rec.id]})"
            )
            continue
        seen[rec.id] = number
        records.append(rec)
    if not records and not problems:
        problems.append("no records")
    if problems:
        raise EvaluationInputError(problems)
    return records


def read_records(path: Path) -> list[EvalRecord]:
    """Read and validate a predictions file."""
    with path.open(encoding="utf-8") as f:
        return parse_records(f)


__all__ = ["EvalRecord", "LesionRecord", "parse_records", "read_records", "record_from_dict"]
