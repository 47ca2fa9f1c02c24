"""ONNX export of the D2R-Net inference graph as three parts.

``detector.onnx``       image (B,1,S,S) -> cls_logits (B,A,C), bbox_regression (B,A,4),
                        bbox_ctrness (B,A,1); decoding + NMS stay on the host
``visual.onnx``         image, boxes (B,K,4), box_mask (B,K) -> enc (B,L,d), enc_mask (B,L)
``decoder_step.onnx``   tokens (B,T), memory_in (B,T,M,d), enc, enc_mask
                        -> logprobs (B,V), memory_out (B,M,d)

Exported with ``torch.onnx.export(..., dynamo=True)`` from batch-2 examples so
the batch (and token) dimensions stay dynamic. Needs ``onnx`` and ``onnxscript``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from model.modeling import D2RNet

OPSET = 18


class DetectorGraph(nn.Module):
    """Stem + FCOS backbone/FPN/head (dense outputs)."""

    def __init__(self, model: D2RNet) -> None:
        super().__init__()
        self.stem, self.detector = model.stem, model.detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.detector.dense(self.stem(image))


class VisualGraph(nn.Module):
    """Global + local branches and the transformer encoder."""

    def __init__(self, model: D2RNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, boxes: Tensor, box_mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.encode(image, boxes, box_mask)


class DecoderStepGraph(nn.Module):
    """One decoder step with the relational memory state as explicit input/output."""

    def __init__(self, model: D2RNet) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(
        self, tokens: Tensor, memory_in: Tensor, enc: Tensor, enc_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self.decoder.step(tokens, memory_in, enc, enc_mask)


@dataclass(frozen=True)
class ExampleInputs:
    """Batch-2 example inputs for the three graphs."""

    image: Tensor
    boxes: Tensor
    box_mask: Tensor
    tokens: Tensor
    memory_in: Tensor
    enc: Tensor
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
    enc, enc_mask = model.encode(image, boxes, box_mask)
    ids = torch.randint(5, cfg.vocab_size, (batch, tokens), generator=g)
    ids[:, 0] = 1
    mem = model.decoder.memory.initial(batch)
    states = [mem]
    emb = model.decoder.embed_tokens(ids)
    for i in range(tokens - 1):
        mem = model.decoder.memory(mem, emb[:, i])
        states.append(mem)
    return ExampleInputs(image, boxes, box_mask, ids, torch.stack(states, dim=1), enc, enc_mask)


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
    t = torch.export.Dim("tokens", min=1, max=model.config.max_tokens)
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
            (ex.image, ex.boxes, ex.box_mask),
            ["image", "boxes", "box_mask"],
            ["enc", "enc_mask"],
            {"image": {0: b}, "boxes": {0: b}, "box_mask": {0: b}},
        ),
        "decoder_step": (
            DecoderStepGraph(model),
            (ex.tokens, ex.memory_in, ex.enc, ex.enc_mask),
            ["tokens", "memory_in", "enc", "enc_mask"],
            ["logprobs", "memory_out"],
            {"tokens": {0: b, 1: t}, "memory_in": {0: b, 1: t}, "enc": {0: b}, "enc_mask": {0: b}},
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
            verbose=False,
        )
        written[part] = path
    return written


__all__ = [
    "DecoderStepGraph",
    "DetectorGraph",
    "ExampleInputs",
    "VisualGraph",
    "example_inputs",
    "export_onnx",
]
