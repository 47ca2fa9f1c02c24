from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import SMALL
from model.export import example_inputs, export_onnx
from model.modeling import D2RNet

ort = pytest.importorskip("onnxruntime")


@pytest.mark.slow
def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = D2RNet(SMALL.replace(vocab_size=40)).eval()
    ex = example_inputs(model, batch=3, tokens=7, seed=1)  # other batch/length than the export
    first_state = model.decoder.initial_state(3)  # an empty cache: the first step
    image = (ex.context, ex.cross, ex.enc_mask)
    with torch.no_grad():
        ref = {
            "detector": model.detector.dense(model.stem(ex.image)),
            "visual": model.decoding_inputs(ex.image, ex.boxes, ex.box_mask, ex.box_scores),
            "decoder_step": model.decoder.step(ex.tokens, ex.memory, ex.cache, *image),
            "first_step": model.decoder.step(ex.tokens, *first_state, *image),
        }
    paths = export_onnx(model, tmp_path)
    feeds = {
        "detector": {"image": ex.image},
        "visual": {
            "image": ex.image,
            "boxes": ex.boxes,
            "box_mask": ex.box_mask,
            "box_scores": ex.box_scores,
        },
        "decoder_step": {
            "tokens": ex.tokens,
            "memory": ex.memory,
            "cache": ex.cache,
            "context": ex.context,
            "cross": ex.cross,
            "enc_mask": ex.enc_mask,
        },
        "first_step": {
            "tokens": ex.tokens,
            "memory": first_state[0],
            "cache": first_state[1],
            "context": ex.context,
            "cross": ex.cross,
            "enc_mask": ex.enc_mask,
        },
    }
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = 2
    assert ex.cache.shape[2] == 6 and first_state[1].shape[2] == 0
    for part, path in [*paths.items(), ("first_step", paths["decoder_step"])]:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in feeds[part].items()})
        assert len(got) == len(ref[part])
        for g, r in zip(got, ref[part], strict=True):
            assert g.shape == tuple(r.shape)
            if r.dtype == torch.bool:
                assert np.array_equal(g, r.numpy())
            else:
                np.testing.assert_allclose(g, r.numpy(), atol=1e-4, rtol=1e-3)
