"""The beam's hypotheses and the report chooser: the written report is always one of them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
import torch

from model.config import SMALL
from model.decoding import beam_hypotheses, beam_search
from model.errors import ModelError
from model.modeling import D2RNet
from model.predict import CHOICE_BEAM_SIZE, Predictor
from model.tokenizer import BOS_ID, EOS_ID

Box = tuple[float, float, float, float]


def _inputs(model: D2RNet, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = torch.zeros(2, 1, size, size)
    image[0, :, 10:40, 10:40] = 1.0
    image[1, :, 50:100, 20:60] = 0.6
    boxes = torch.tensor([[[10.0, 10.0, 40.0, 40.0]] * 4, [[20.0, 50.0, 60.0, 100.0]] * 4])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    scores = torch.zeros(2, 4, 22)
    scores[0, :, 3] = scores[1, :, 16] = 0.9
    return model.decoding_inputs(image, boxes, mask, scores * mask[..., None])


def test_beam_hypotheses_are_distinct_sorted_and_scored_by_the_decoder() -> None:
    torch.manual_seed(0)
    cfg = SMALL.replace(vocab_size=12, image_size=128, crop_size=32)
    model = D2RNet(cfg).eval()
    with torch.no_grad():  # EOS likely enough that beams finish at several lengths
        model.decoder.out.bias[EOS_ID] = 0.5
    with torch.no_grad():
        inputs = _inputs(model, cfg.image_size)
    beams = beam_hypotheses(model.decoder, *inputs, beam_size=4, max_tokens=12)
    best = beam_search(model.decoder, *inputs, beam_size=4, max_tokens=12)
    lengths = {len(h.ids) for hyps in beams for h in hyps}
    assert 11 in lengths and len(lengths) > 2, "finished and length-capped beams"
    for image, hyps in enumerate(beams):
        assert len(hyps) == 4
        assert len({h.ids for h in hyps}) == 4
        assert [h.logprob for h in hyps] == sorted((h.logprob for h in hyps), reverse=True)
        assert list(hyps[0].ids) == best[image]
        for h in hyps:  # the score is the teacher-forced log-probability of the sequence
            finished = len(h.ids) < 11
            seq = [BOS_ID, *h.ids, *([EOS_ID] if finished else [])]
            context, cross, mask = (t[image : image + 1] for t in inputs)
            memory, cache = model.decoder.initial_state(1, context.device)
            total = 0.0
            for pos in range(len(seq) - 1):
                with torch.no_grad():
                    logp, memory, entries = model.decoder.step(
                        torch.tensor([[seq[pos]]]), memory, cache, context, cross, mask
                    )
                cache = torch.cat([cache, entries], dim=2)
                total += float(logp[0, seq[pos + 1]])
            assert h.logprob == pytest.approx(total, abs=1e-3)


class _Recorder:
    """A chooser that records what it was offered and picks ``pick`` (negative: from the end)."""

    def __init__(self, pick: int) -> None:
        self.pick = pick
        self.calls: list[tuple[list[tuple[str, str]], list[tuple[str, Box]], int, int]] = []

    def __call__(
        self,
        candidates: Sequence[tuple[str, str]],
        boxes: Sequence[tuple[str, Box]],
        columns: int,
        rows: int,
    ) -> int:
        self.calls.append((list(candidates), list(boxes), columns, rows))
        return self.pick % len(candidates) if self.pick < 0 else self.pick


@pytest.fixture(scope="module")
def plain(small_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(small_checkpoint, lesion_score_threshold=0.0, input_gate=False)


def test_chosen_report_is_one_of_the_beams_with_the_study_lesions(
    small_checkpoint: Path, rg1: pydicom.Dataset, plain: Predictor
) -> None:
    last = _Recorder(-1)
    predictor = Predictor.from_checkpoint(
        small_checkpoint, lesion_score_threshold=0.0, input_gate=False, choose_report=last
    )
    assert predictor.beam_size == max(CHOICE_BEAM_SIZE, predictor.config.beam_size)
    assert f"report: chosen among a beam of {predictor.beam_size} by " in predictor.parameters[2]
    result = predictor.predict([rg1])
    (candidates, boxes, columns, rows), *more = last.calls
    assert not more
    assert len(candidates) == predictor.beam_size
    assert len(set(candidates)) > 1, "the beam must offer different reports"
    assert (result.findings, result.impression) == candidates[-1]
    assert boxes == [(le.class_name, le.box) for le in result.lesions]
    assert (columns, rows) == (rg1.Columns, rg1.Rows)
    first = _Recorder(0)
    same_beam = Predictor.from_checkpoint(
        small_checkpoint, lesion_score_threshold=0.0, input_gate=False, choose_report=first
    )
    chosen = same_beam.predict([rg1])
    assert (chosen.findings, chosen.impression) == first.calls[0][0][0]
    # without a chooser: the most probable report of the checkpoint's own beam
    probable = plain.predict([rg1])
    narrow = _Recorder(0)
    Predictor.from_checkpoint(
        small_checkpoint,
        lesion_score_threshold=0.0,
        input_gate=False,
        beam_size=plain.config.beam_size,
        choose_report=narrow,
    ).predict([rg1])
    assert (probable.findings, probable.impression) == narrow.calls[0][0][0]


def test_batch_prediction_makes_the_same_choice(
    small_checkpoint: Path, rg1: pydicom.Dataset
) -> None:
    chooser = _Recorder(-1)
    predictor = Predictor.from_checkpoint(
        small_checkpoint, lesion_score_threshold=0.0, input_gate=False, choose_report=chooser
    )
    alone = predictor.predict([rg1])
    batch = predictor.predict_batch([[rg1], [rg1]])
    for got in batch:
        assert not isinstance(got, Exception)
        assert (got.findings, got.impression) == (alone.findings, alone.impression)
    assert len(chooser.calls) == 3


def test_a_chooser_out_of_range_is_a_model_error(
    small_checkpoint: Path, rg1: pydicom.Dataset
) -> None:
    predictor = Predictor.from_checkpoint(
        small_checkpoint, lesion_score_threshold=0.0, input_gate=False, choose_report=_Recorder(99)
    )
    with pytest.raises(ModelError, match="99 of"):
        predictor.predict([rg1])
