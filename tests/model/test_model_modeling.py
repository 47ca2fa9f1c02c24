from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.branches import box_geometry, crop_boxes
from model.config import PAPER, SMALL, ModelConfig
from model.decoding import beam_search
from model.detector import select_boxes
from model.modeling import D2RNet, count_parameters
from model.tokenizer import BOS_ID, EOS_ID, Tokenizer
from training.losses import AlignmentLosses, lm_loss

REPORTS = [
    ("The heart is normal. The lungs are clear.", "No acute disease."),
    ("There is a small left pleural effusion.", "Small left effusion."),
    ("Right lower lobe consolidation is seen.", "Right lower lobe pneumonia."),
]


def _batch(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three distinct synthetic images with 1, 2 and 3 real boxes (one class each)."""
    s = size / 128
    img = torch.zeros(3, 1, size, size)
    img[0, :, int(10 * s) : int(60 * s), int(10 * s) : int(60 * s)] = 1.0
    img[1, :, int(60 * s) : int(120 * s), int(20 * s) : int(50 * s)] = 0.7
    img[2, :, int(30 * s) : int(90 * s), int(70 * s) : int(120 * s)] = 0.4
    boxes = (
        torch.tensor(
            [[[10, 10, 60, 60]] * 4, [[20, 60, 50, 120]] * 4, [[70, 30, 120, 90]] * 4],
            dtype=torch.float32,
        )
        * s
    )
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    scores = torch.zeros(3, 4, 22)
    for i, cls in enumerate((3, 16, 5)):
        scores[i, :, cls] = 0.9
    return img, boxes, mask, scores * mask[..., None]


def _tokens(tok: Tokenizer) -> torch.Tensor:
    ids = [tok.encode(*r) for r in REPORTS]
    out = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x)
    return out


@pytest.mark.slow
def test_paper_preset_forward_and_generate() -> None:
    tok = Tokenizer.build(REPORTS, min_frequency=1)
    torch.manual_seed(0)
    model = D2RNet(PAPER.replace(vocab_size=tok.vocab_size)).eval()
    assert 120e6 < count_parameters(model) < 140e6
    image = torch.rand(1, 1, 384, 384)
    with torch.no_grad():
        boxes, mask, scores = model.generator_boxes(image)
        assert boxes.shape == (1, PAPER.num_boxes, 4)
        assert scores.shape == (1, PAPER.num_boxes, PAPER.num_classes)
        feats = model.visual_features(image, boxes, mask, scores)
        assert feats.patches.shape == (1, 144, 1024)  # 12 x 12 patches of ResNet-101 at 384 px
        assert feats.regions.shape == (1, PAPER.num_boxes, 1024)
        logp = model(image, boxes, mask, scores, _tokens(tok)[:1])
        assert logp.shape[-1] == tok.vocab_size
        assert torch.allclose(logp.exp().sum(-1), torch.ones(1), atol=1e-4)
        ids = model.generate(image, boxes, mask, scores, max_tokens=6)
    assert len(ids) == 1 and len(ids[0]) <= 5
    assert all(0 <= i < tok.vocab_size and i != BOS_ID for i in ids[0])


def test_small_preset_builds() -> None:
    model = D2RNet(SMALL.replace(vocab_size=20))
    assert 5e6 < count_parameters(model) < 8e6  # narrow ResNets: a demo checkpoint < 30 MB
    with pytest.raises(Exception, match="vocab_size"):
        D2RNet(SMALL)  # no vocabulary attached


def test_small_model_overfits_and_beam_reproduces_reports() -> None:
    tok = Tokenizer.build(REPORTS, min_frequency=1)
    # the small architecture at a 128 px input keeps the test fast on CPU
    cfg = SMALL.replace(vocab_size=tok.vocab_size, image_size=128, crop_size=32)
    torch.manual_seed(0)
    model = D2RNet(cfg)
    image, boxes, mask, scores = _batch(cfg.image_size)
    tokens = _tokens(tok)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    model.train()
    for _ in range(300):
        loss = lm_loss(model(image, boxes, mask, scores, tokens), tokens)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(loss.item())
        if losses[-1] < 0.002:  # well past the point where every first token is decided
            break
    assert losses[-1] < 0.1 * losses[0]
    model.eval()
    for beam in (3, 1):
        out = model.generate(image, boxes, mask, scores, beam_size=beam)
        assert [tok.decode(ids) for ids in out] == REPORTS


@pytest.mark.parametrize("layers", [1, 2])
def test_decoder_step_matches_teacher_forcing(layers: int) -> None:
    torch.manual_seed(0)
    cfg = SMALL.replace(vocab_size=30, image_size=128, crop_size=32, num_decoder_layers=layers)
    model = D2RNet(cfg).eval()
    image, boxes, mask, scores = _batch(cfg.image_size)
    tokens = torch.tensor([[BOS_ID, 7, 9, 11, 5]] * 3)
    with torch.no_grad():
        enc, enc_mask = model.encode(image, boxes, mask, scores)
        full = model.decoder(enc, enc_mask, tokens)  # (3,5,V)
        context, cross = model.decoder.prepare(enc, enc_mask)
        assert cross.shape == (3, 2 * layers, enc.shape[1], cfg.d_model)
        memory, cache = model.decoder.initial_state(3)
        assert cache.shape == (3, 2 * layers, 0, cfg.d_model)
        for t in range(tokens.shape[1]):
            logp, memory, entries = model.decoder.step(
                tokens[:, t : t + 1], memory, cache, context, cross, enc_mask
            )
            torch.testing.assert_close(logp, full[:, t], atol=1e-5, rtol=1e-4)
            cache = torch.cat([cache, entries], dim=2)


def test_padding_boxes_are_masked_out() -> None:
    torch.manual_seed(0)
    cfg = SMALL.replace(vocab_size=30, image_size=128, crop_size=32)
    model = D2RNet(cfg).eval()
    image, boxes, mask, scores = _batch(cfg.image_size)
    moved = boxes.clone()
    moved[~mask] = torch.tensor([0.0, 0.0, 5.0, 5.0])
    with torch.no_grad():
        a, ma = model.encode(image, boxes, mask, scores)
        b, _ = model.encode(image, moved, mask, scores)
        c, _ = model.encode(image, moved, torch.ones_like(mask), scores)
    assert ma.shape == (3, 16 + 4) and not ma[0, -1]
    torch.testing.assert_close(a[ma], b[ma])
    assert not torch.allclose(b[0, :16], c[0, :16])  # unmasked boxes do change the patches


def test_region_tokens_carry_class_scores_and_geometry() -> None:
    torch.manual_seed(0)
    cfg = SMALL.replace(vocab_size=30, image_size=128, crop_size=32)
    model = D2RNet(cfg).eval()
    image, boxes, mask, scores = _batch(cfg.image_size)
    other = torch.zeros_like(scores)
    other[..., 7] = 0.9
    shifted = boxes.clone()
    shifted[2, 0] = torch.tensor([8.0, 30.0, 58.0, 90.0])  # same size, other side of the image
    shifted_image = image.clone()
    shifted_image[2] = 0.0
    shifted_image[2, :, 30:90, 8:58] = 0.4  # the same content under the moved box
    with torch.no_grad():
        base = model.visual_features(image, boxes, mask, scores).regions
        relabelled = model.visual_features(image, boxes, mask, other).regions
        moved = model.visual_features(shifted_image, shifted, mask, scores).regions
        weaker = model.visual_features(image, boxes, mask, scores * 0.5).regions
    assert not torch.allclose(base[0, 0], relabelled[0, 0])  # the class changes the token
    assert not torch.allclose(base[0, 0], weaker[0, 0])  # so does the detector's confidence
    crop = model.visual.local_branch
    with torch.no_grad():  # identical crops at two places differ only by the geometry term
        a = crop.cnn(crop.lera(crop_boxes(image[2:], boxes[2:, :1], 32).expand(-1, 3, -1, -1)))
        b = crop.cnn(
            crop.lera(crop_boxes(shifted_image[2:], shifted[2:, :1], 32).expand(-1, 3, -1, -1))
        )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(base[2, 0], moved[2, 0], atol=1e-4)


def test_global_token_summarises_the_whole_grid() -> None:
    torch.manual_seed(0)
    cfg = SMALL.replace(vocab_size=30, image_size=128, crop_size=32, global_token=True)
    assert ModelConfig.from_dict(cfg.to_dict()).global_token
    old = cfg.to_dict()
    del old["global_token"]  # a checkpoint from before the option has no global token
    assert not ModelConfig.from_dict(old).global_token
    model = D2RNet(cfg).eval()
    image, boxes, mask, scores = _batch(cfg.image_size)
    branch = model.visual.global_branch
    assert branch.summary is not None
    with torch.no_grad():
        feats = model.visual_features(image, boxes, mask, scores)
        trunk = branch.trunk(model.stem(image))
        summary = branch.summary(trunk)
        seen = branch.observation_embed(torch.sigmoid(branch.observations(summary)))
        enc, enc_mask = model.encode(image, boxes, mask, scores)
    assert feats.patches.shape == (3, 2 + 16, cfg.visual_dim)
    torch.testing.assert_close(feats.patches[:, 0], summary)
    torch.testing.assert_close(feats.patches[:, 1], seen)
    assert enc.shape[1] == enc_mask.shape[1] == 2 + 16 + 4 and enc_mask[:, :2].all()
    with torch.no_grad():
        other = model.visual_features(image.flip(-1), boxes, mask, scores).patches
    assert not torch.allclose(other[:, 0], feats.patches[:, 0])  # it reads the image


def test_box_geometry_spreads_small_differences() -> None:
    values = torch.tensor([[0.3, 0.5, 0.16, 0.16], [0.3, 0.5, 0.20, 0.20]])
    assert torch.equal(box_geometry(values, 0), values)
    features = box_geometry(values, 6)
    assert features.shape == (2, 4 * 13)
    torch.testing.assert_close(features[:, :4], values)
    assert torch.allclose(features[:, 4:].abs().amax(), torch.tensor(1.0), atol=1e-3)
    # 0.04 of the image side apart: raw values differ by 0.04, the features by far more
    assert (features[0] - features[1]).norm() > 10 * (values[0] - values[1]).norm()


def test_crop_boxes_zero_pads_and_normalises() -> None:
    image = torch.zeros(1, 1, 64, 64)
    image[0, 0, 10:20, 30:50] = torch.linspace(0, 1, 20)  # 10 rows x 20 columns ramp
    crops = crop_boxes(image, torch.tensor([[[30.0, 10.0, 50.0, 20.0]]]), 16)
    assert crops.shape == (1, 1, 16, 16)
    assert crops[0, 0, :3].abs().max() == 0 and crops[0, 0, -3:].abs().max() == 0  # pad rows
    inside = crops[0, 0, 5:11]
    assert abs(float(inside.mean())) < 0.1 and 0.8 < float(inside.std()) < 1.2
    assert bool((inside[:, 1:] > inside[:, :-1]).all())  # ramp direction kept


def test_select_boxes_pads_and_orders() -> None:
    from model.detector import Detections

    det = Detections(
        torch.tensor([[0.0, 0, 5, 5], [1, 1, 9, 9]]), torch.tensor([0.2, 0.9]), torch.tensor([0, 1])
    )
    boxes, mask, scores = select_boxes([det], 3, 4)
    assert mask.tolist() == [[True, True, False]]
    assert boxes[0, 0].tolist() == [1, 1, 9, 9]
    # each box carries its detection score at its class, nothing elsewhere
    expected = torch.tensor([[[0.0, 0.9, 0, 0], [0.2, 0, 0, 0], [0, 0, 0, 0]]])
    torch.testing.assert_close(scores, expected)


def test_beam_search_no_repeat_trigram() -> None:
    torch.manual_seed(0)
    cfg = SMALL.replace(vocab_size=12, image_size=128, crop_size=32)
    model = D2RNet(cfg).eval()
    with torch.no_grad():  # bias the output towards a loop of 6 7 8
        model.decoder.out.bias.zero_()
        model.decoder.out.bias[6:9] = 8.0
        model.decoder.out.bias[EOS_ID] = -20.0
    image, boxes, mask, scores = _batch(cfg.image_size)
    image_inputs = model.decoding_inputs(image[:1], boxes[:1], mask[:1], scores[:1])
    plain = beam_search(model.decoder, *image_inputs, beam_size=3, max_tokens=20)[0]
    blocked = beam_search(
        model.decoder, *image_inputs, beam_size=3, max_tokens=20, no_repeat_trigram=True
    )[0]
    trigrams = [tuple(blocked[i : i + 3]) for i in range(len(blocked) - 2)]
    assert len(trigrams) == len(set(trigrams))
    plain_trigrams = [tuple(plain[i : i + 3]) for i in range(len(plain) - 2)]
    assert len(plain_trigrams) > len(set(plain_trigrams))


def test_alignment_losses_with_tiny_text_encoder() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg: ModelConfig = SMALL.replace(vocab_size=30, image_size=128, crop_size=32)
    model = D2RNet(cfg)
    bert = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    align = AlignmentLosses(cfg, bert)
    image, boxes, mask, scores = _batch(cfg.image_size)
    feats = model.visual_features(image, boxes, mask, scores)
    report = torch.randint(1, 50, (3, 12))
    report_mask = torch.ones(3, 12, dtype=torch.long)
    sentences = torch.randint(1, 50, (3, 2, 6))
    sentence_mask = torch.ones(3, 2, 6, dtype=torch.long)
    sentence_mask[0, 1] = 0  # a padding sentence
    out = align(feats, report, report_mask, sentences, sentence_mask)
    assert out["lab_similarity"].shape == (3, 3) and out["gab_similarity"].shape == (3, 3)
    total = cfg.lab_weight * out["lab"] + cfg.gab_weight * out["gab"]
    assert float(total.detach()) > 0
    total.backward()
    first = model.visual.local_branch.cnn.body[0]
    assert isinstance(first, torch.nn.Conv2d)
    grad = first.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_inference_path_never_loads_transformers(small_checkpoint: Path, rg1_path: Path) -> None:
    code = (
        "import sys, pydicom; from pathlib import Path; from model.predict import Predictor;"
        f"p = Predictor.from_checkpoint(Path({str(small_checkpoint)!r}), input_gate=False);"
        f"p.predict([pydicom.dcmread({str(rg1_path)!r})]);"
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
