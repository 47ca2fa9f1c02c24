"""A batch of studies gives each study the same report as predicting it alone (CPU).

``Predictor.predict_batch`` runs the detector, the visual graph and the decoder once for the
whole batch; the lesions, the report text and the input gate's decision must not depend on
which other studies share the batch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from pydicom.uid import generate_uid
from torch import Tensor

from model.errors import PreprocessError
from model.predict import Predictor, StudyPrediction
from model.preprocess import Preprocessor
from worker.settings import BUNDLED_MODEL

pytestmark = pytest.mark.slow


def _assert_same(batched: StudyPrediction | Exception, alone: StudyPrediction) -> None:
    assert isinstance(batched, StudyPrediction), batched
    assert batched.sop_instance_uid == alone.sop_instance_uid
    assert batched.findings == alone.findings
    assert batched.impression == alone.impression
    assert batched.abstained == alone.abstained
    assert batched.abstain_reason == alone.abstain_reason
    assert [x.class_name for x in batched.lesions] == [x.class_name for x in alone.lesions]
    for x, y in zip(batched.lesions, alone.lesions, strict=True):
        assert max(abs(u - v) for u, v in zip(x.box, y.box, strict=True)) <= 0.5
        assert abs(x.score - y.score) < 1e-4
    if alone.ood_score is None:
        assert batched.ood_score is None
    else:
        assert batched.ood_score == pytest.approx(alone.ood_score, rel=1e-4)


def _undecodable(ds: pydicom.Dataset) -> pydicom.Dataset:
    bad = copy.deepcopy(ds)
    bad.SOPInstanceUID = generate_uid()
    bad.PixelData = bytes(ds.PixelData)[:100]  # truncated pixel data
    return bad


@pytest.mark.parametrize("beam", [1, 3], ids=["greedy", "beam3"])
def test_batch_equals_each_study_alone(
    model_dir: Path, phantom_studies: list[pydicom.Dataset], rg1: pydicom.Dataset, beam: int
) -> None:
    predictor = Predictor.from_checkpoint(
        model_dir, lesion_score_threshold=0.0, beam_size=beam, input_gate=False
    )
    images = [*phantom_studies, rg1]
    alone = [predictor.predict([ds]) for ds in images]
    assert all(p.lesions for p in alone), "threshold 0 must give lesions"
    batched = predictor.predict_batch([[ds] for ds in images])
    assert len(batched) == len(images)
    for b, a in zip(batched, alone, strict=True):
        _assert_same(b, a)
    # the order of the studies in the batch changes nothing
    reversed_batch = predictor.predict_batch([[ds] for ds in images[::-1]])
    for b, a in zip(reversed_batch, alone[::-1], strict=True):
        _assert_same(b, a)


def test_demo_model_batch_with_an_abstention_and_an_undecodable_image(
    phantom_studies: list[pydicom.Dataset], rg1: pydicom.Dataset
) -> None:
    predictor = Predictor.from_checkpoint(BUNDLED_MODEL)  # input gate on
    bad = _undecodable(phantom_studies[0])
    studies = [[phantom_studies[0]], [rg1], [bad], [phantom_studies[1]], []]
    seen: list[tuple[int, str]] = []
    batched = predictor.predict_batch(studies, on_stage=lambda i, s: seen.append((i, s)))
    alone = predictor.predict([rg1])
    assert alone.abstained  # a real radiograph is outside the demo model's inputs
    _assert_same(batched[1], alone)
    for i in (0, 3):
        _assert_same(batched[i], predictor.predict(studies[i]))
        assert seen.count((i, "predict")) == 1
    assert isinstance(batched[2], PreprocessError) and (2, "predict") not in seen
    assert isinstance(batched[4], PreprocessError)  # a study without an image
    with pytest.raises(PreprocessError):
        predictor.predict([bad])


class _PoisonedBackend:
    """Delegates to the real backend, but its detector raises for a batch holding ``poison``
    (a sample that crashes the model), as a device error would."""

    def __init__(self, inner: Any, poison: Tensor) -> None:
        self._inner = inner
        self._poison = poison
        self.name, self.device = inner.name, inner.device
        self.calls: list[int] = []

    def detector(self, image: Tensor) -> Any:
        self.calls.append(image.shape[0])
        if any(torch.equal(img, self._poison) for img in image):
            raise RuntimeError("device-side assert triggered")
        return self._inner.detector(image)

    def visual(self, *args: Tensor) -> Any:
        return self._inner.visual(*args)

    def decoder_step(self, *args: Tensor) -> Any:
        return self._inner.decoder_step(*args)


def test_a_sample_that_crashes_the_batch_fails_only_its_own_study(
    model_dir: Path, phantom_studies: list[pydicom.Dataset], rg1: pydicom.Dataset
) -> None:
    predictor = Predictor.from_checkpoint(model_dir, lesion_score_threshold=0.0, input_gate=False)
    alone = [predictor.predict([ds]) for ds in phantom_studies]
    pixels, _ = Preprocessor(predictor.config.image_size)(rg1)
    poisoned = _PoisonedBackend(predictor.backend, pixels)
    predictor.backend = poisoned
    batched = predictor.predict_batch(
        [[phantom_studies[0]], [rg1], *[[ds] for ds in phantom_studies[1:]]]
    )
    assert poisoned.calls[0] == len(phantom_studies) + 1  # tried as one batch first
    assert isinstance(batched[1], RuntimeError) and "device-side" in str(batched[1])
    for b, a in zip([batched[0], *batched[2:]], alone, strict=True):
        _assert_same(b, a)


def test_a_batch_larger_than_the_backend_takes_runs_in_parts(
    model_dir: Path, phantom_studies: list[pydicom.Dataset]
) -> None:
    predictor = Predictor.from_checkpoint(model_dir, lesion_score_threshold=0.0, input_gate=False)
    alone = [predictor.predict([ds]) for ds in phantom_studies]
    counting = _PoisonedBackend(predictor.backend, torch.full((1, 1, 1), -1.0))
    predictor.backend, predictor.max_batch = counting, 2
    batched = predictor.predict_batch([[ds] for ds in phantom_studies])
    assert counting.calls == [2, 1]
    for b, a in zip(batched, alone, strict=True):
        _assert_same(b, a)
