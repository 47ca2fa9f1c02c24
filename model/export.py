"""ONNX export of the D2R-Net inference graph as three parts.

``detector.onnx``       image (B,1,S,S) -> cls_logits (B,A,C), bbox_regression (B,A,4),
                        bbox_ctrness (B,A,1); decoding + NMS stay on the host
``visual.onnx``         image, boxes (B,K,4), box_mask (B,K), box_scores (B,K,C)
                        -> context (B,1,d), cross (B,2N,L,d), enc_mask (B,L)
``decoder_step.onnx``   tokens (B,1), memory (B,M,d), cache (B,2N,P,d), context, cross,
                        enc_mask -> logprobs (B,V), memory_out (B,M,d), cache_out (B,2N,1,d)

The visual graph ends with what every decoding step reads of the image: the visual context
and the cross-attention keys/values of the encoder states in each of the ``N`` decoder
layers. The decoder step takes the newest token and the state left by the earlier steps:
the relational memory and the self-attention keys/values of the ``P`` earlier positions
(``P`` = 0 at the first step), so each step costs the same whatever the length so far.

Exported with ``torch.onnx.export(..., dynamo=True)`` from batch-2 examples so the batch
(and ``past``) dimensions stay dynamic. Needs ``onnx`` and ``onnxscript``.

:func:`export_checkpoint` is the offline entry point (``d2r export-onnx``): it exports a
checkpoint directory, checks every graph with ``onnx.checker``, keeps the weights in
``<part>.onnx.data`` beside each graph and writes ``export.json``, which names the
checkpoint (sha256) the graphs came from. Serving backends refuse a directory whose
``export.json`` names another checkpoint.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.errors import ExportError
from model.modeling import D2RNet

logger = logging.getLogger(__name__)

OPSET = 18
#: the three graphs, in inference order
PARTS = ("detector", "visual", "decoder_step")
EXPORT_FORMAT = "d2r-onnx-export/2"
EXPORT_FILE = "export.json"


class DetectorGraph(nn.Module):
    """Stem + FCOS backbone/FPN/head (dense outputs)."""

    def __init__(self, model: D2RNet) -> None:
        super().__init__()
        self.stem, self.detector = model.stem, model.detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.detector.dense(self.stem(image))


class VisualGraph(nn.Module):
    """Global + local branches, the transformer encoder and what the decoder reads of them."""

    def __init__(self, model: D2RNet) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, image: Tensor, boxes: Tensor, box_mask: Tensor, box_scores: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.model.decoding_inputs(image, boxes, box_mask, box_scores)


class DecoderStepGraph(nn.Module):
    """One decoder step with its state (relational memory, key/value cache) as explicit
    input/output."""

    def __init__(self, model: D2RNet) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(
        self,
        tokens: Tensor,
        memory: Tensor,
        cache: Tensor,
        context: Tensor,
        cross: Tensor,
        enc_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.decoder.step(tokens, memory, cache, context, cross, enc_mask)


@dataclass(frozen=True)
class ExampleInputs:
    """Batch-2 example inputs for the three graphs."""

    image: Tensor
    boxes: Tensor
    box_mask: Tensor
    box_scores: Tensor
    tokens: Tensor  # (B,1) the newest id
    memory: Tensor
    cache: Tensor
    context: Tensor
    cross: Tensor
    enc_mask: Tensor


@torch.no_grad()
def example_inputs(
    model: D2RNet, *, batch: int = 2, tokens: int = 5, seed: int = 0
) -> ExampleInputs:
    """Deterministic example inputs (one padding box in the first image)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    s, k = cfg.image_size, cfg.num_boxes
    image = torch.rand(batch, 1, s, s, generator=g)
    xy = torch.rand(batch, k, 2, generator=g) * s * 0.6
    wh = torch.rand(batch, k, 2, generator=g) * s * 0.3 + 4.0
    boxes = torch.cat([xy, xy + wh], dim=-1)
    box_mask = torch.ones(batch, k, dtype=torch.bool)
    box_mask[0, -1] = False
    labels = torch.randint(0, cfg.num_classes, (batch, k), generator=g)
    box_scores = torch.nn.functional.one_hot(labels, cfg.num_classes).float()
    box_scores = box_scores * torch.rand(batch, k, 1, generator=g) * box_mask[..., None]
    context, cross, enc_mask = model.decoding_inputs(image, boxes, box_mask, box_scores)
    ids = torch.randint(5, cfg.vocab_size, (batch, tokens), generator=g)
    ids[:, 0] = 1
    memory, cache = model.decoder.initial_state(batch)
    for i in range(tokens - 1):  # the state after all but the last token
        step = (ids[:, i : i + 1], memory, cache, context, cross, enc_mask)
        _, memory, entries = model.decoder.step(*step)
        cache = torch.cat([cache, entries], dim=2)
    return ExampleInputs(
        image, boxes, box_mask, box_scores, ids[:, -1:], memory, cache, context, cross, enc_mask
    )


# Longer than a screen: one block per exported graph, each with its dynamic axes
def export_onnx(
    model: D2RNet, out_dir: Path, *, parts: tuple[str, ...] = ("detector", "visual", "decoder_step")
) -> dict[str, Path]:
    """Export the requested graphs into ``out_dir``; returns part -> ``.onnx`` path.

    Weights go to ``<part>.onnx.data`` next to each graph when large.
    """
    model = model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    ex = example_inputs(model)
    b = torch.export.Dim("batch", min=1, max=64)
    past = torch.export.Dim("past", min=0, max=model.config.max_tokens)
    specs: dict[
        str, tuple[nn.Module, tuple[Tensor, ...], list[str], list[str], dict[str, object]]
    ] = {
        "detector": (
            DetectorGraph(model),
            (ex.image,),
            ["image"],
            ["cls_logits", "bbox_regression", "bbox_ctrness"],
            {"image": {0: b}},
        ),
        "visual": (
            VisualGraph(model),
            (ex.image, ex.boxes, ex.box_mask, ex.box_scores),
            ["image", "boxes", "box_mask", "box_scores"],
            ["context", "cross", "enc_mask"],
            {"image": {0: b}, "boxes": {0: b}, "box_mask": {0: b}, "box_scores": {0: b}},
        ),
        "decoder_step": (
            DecoderStepGraph(model),
            (ex.tokens, ex.memory, ex.cache, ex.context, ex.cross, ex.enc_mask),
            ["tokens", "memory", "cache", "context", "cross", "enc_mask"],
            ["logprobs", "memory_out", "cache_out"],
            {
                "tokens": {0: b},
                "memory": {0: b},
                "cache": {0: b, 2: past},
                "context": {0: b},
                "cross": {0: b},
                "enc_mask": {0: b},
            },
        ),
    }
    written: dict[str, Path] = {}
    for part in parts:
        module, args, inputs, outputs, dyn = specs[part]
        module.eval()
        path = out_dir / f"{part}.onnx"
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dyn,
            external_data=True,
            verbose=False,
        )
        written[part] = path
    return written


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _value_info(value: Any) -> dict[str, Any]:
    import onnx

    tensor = value.type.tensor_type
    shape: list[int | str] = [d.dim_param or int(d.dim_value) for d in tensor.shape.dim]
    return {
        "name": value.name,
        "dtype": onnx.TensorProto.DataType.Name(tensor.elem_type).lower(),
        "shape": shape,
    }


def describe_graph(path: Path) -> dict[str, Any]:
    """Check one exported graph with ``onnx.checker`` and describe its interface.

    Returns ``{"file", "data", "inputs", "outputs", "dynamic_axes"}``; ``dynamic_axes``
    maps each input/output name to ``{axis: symbolic name}``.
    """
    import onnx

    data = path.with_name(path.name + ".data")
    if not data.is_file():
        raise ExportError(f"{path.name}: weights file {data.name} is missing")
    try:
        onnx.checker.check_model(str(path))  # a path, so external data is checked too
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name}: onnx.checker failed: {e}") from e
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = [_value_info(v) for v in graph.input]
    outputs = [_value_info(v) for v in graph.output]
    dynamic = {
        v["name"]: {str(i): d for i, d in enumerate(v["shape"]) if isinstance(d, str)}
        for v in inputs + outputs
    }
    return {
        "file": path.name,
        "data": data.name,
        "sha256": _file_sha256(path),
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_axes": {k: v for k, v in dynamic.items() if v},
    }


def export_checkpoint(checkpoint_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Export a checkpoint directory to ``out_dir`` and write ``export.json``.

    Parameters
    ----------
    checkpoint_dir : Path
        A D2R-Net checkpoint (``model.checkpoint`` format).
    out_dir : Path
        Receives ``<part>.onnx`` + ``<part>.onnx.data`` for each of :data:`PARTS`
        and ``export.json``.

    Returns
    -------
    dict
        The ``export.json`` content.
    """
    from model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(Path(checkpoint_dir))
    started = time.perf_counter()
    paths = export_onnx(ckpt.model, Path(out_dir))
    seconds = time.perf_counter() - started
    cfg = ckpt.config
    manifest: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "checkpoint_sha256": ckpt.sha256,
        "model": {"name": ckpt.info.name, "version": ckpt.info.version},
        "config": {
            "image_size": cfg.image_size,
            "num_boxes": cfg.num_boxes,
            "max_tokens": cfg.max_tokens,
            "vocab_size": cfg.vocab_size,
            "memory_slots": cfg.memory_slots,
            "d_model": cfg.d_model,
        },
        "opset": OPSET,
        "exporter": "torch.onnx.export(dynamo=True)",
        "example_batch": 2,
        "graphs": {part: describe_graph(path) for part, path in paths.items()},
        "versions": {
            "torch": torch.__version__,
            "onnx": _version("onnx"),
            "onnxscript": _version("onnxscript"),
        },
        "export_seconds": round(seconds, 1),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (Path(out_dir) / EXPORT_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    logger.info("exported checkpoint %s to ONNX in %.1f s", ckpt.sha256[:12], seconds)
    return manifest


def read_export(export_dir: Path, *, checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """Read and validate ``export.json``; refuse graphs of another checkpoint.

    Raises
    ------
    ExportError
        Missing or malformed ``export.json``, a missing graph or weights file, or
        (when ``checkpoint_sha256`` is given) a checkpoint hash that differs.
    """
    path = Path(export_dir) / EXPORT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: missing (not an ONNX export directory)") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable ({e})") from e
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: format must be {EXPORT_FORMAT!r}")
    graphs = data.get("graphs")
    if not isinstance(graphs, dict) or set(graphs) != set(PARTS):
        raise ExportError(f"{path}: graphs must be {', '.join(PARTS)}")
    for part in PARTS:
        for key in ("file", "data"):
            name = graphs[part].get(key) if isinstance(graphs[part], dict) else None
            if not isinstance(name, str) or not (path.parent / name).is_file():
                raise ExportError(f"{path}: graphs.{part}.{key} file {name!r} is missing")
    found = data.get("checkpoint_sha256")
    if checkpoint_sha256 is not None and found != checkpoint_sha256:
        raise ExportError(
            f"{path}: exported from checkpoint {str(found)[:12]}, "
            f"but the loaded checkpoint is {checkpoint_sha256[:12]}"
        )
    return data


__all__ = [
    "EXPORT_FILE",
    "OPSET",
    "PARTS",
    "DecoderStepGraph",
    "DetectorGraph",
    "ExampleInputs",
    "ExportError",
    "VisualGraph",
    "describe_graph",
    "example_inputs",
    "export_checkpoint",
    "export_onnx",
    "read_export",
]
