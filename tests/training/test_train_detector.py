"""Semi-supervised detector: burn-in and teacher-student steps, EMA, augmentation, pseudo-labels."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.config import SMALL
from model.modeling import D2RNet
from training.data import (
    Sample,
    prepare_samples,
    random_affine,
    sample_generator,
    strong_augment,
)
from training.detector import (
    DetectorModel,
    DetectorTrainConfig,
    annotate_entries,
    coco_results,
    ema_update,
    pseudo_label,
    pseudo_targets,
    total_loss,
    train_detector,
)
from training.phantom_output import PhantomConfig, generate
from training.train import read_records

REPO = Path(__file__).resolve().parents[2]
CFG = SMALL.replace(image_size=128, vocab_size=8)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "p"
    generate(PhantomConfig(studies=10, seed=41, size=128, dicom_size=0, normal_fraction=0.0), out)
    return out


@pytest.fixture(scope="module")
def samples(phantom: Path) -> list[Sample]:
    return prepare_samples(read_records(phantom), 128)


def _loss(model: D2RNet, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> float:
    """Training-mode loss on a copy (BatchNorm statistics of ``model`` stay untouched)."""
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        return float(total_loss(DetectorModel(probe).loss(images, targets)))


def test_boxes_follow_the_letterbox_mapping(phantom: Path, samples: list[Sample]) -> None:
    records = {r.id: r for r in read_records(phantom)}
    for s in samples:
        rec = records[s.id]
        assert s.mapping is not None and s.image.shape == (1, 128, 128)
        expected = torch.tensor(s.mapping.to_frame([b.box for b in rec.boxes]), dtype=torch.float32)
        assert torch.allclose(s.boxes, expected)
        # phantom PNGs are 128 px squares: the frame is the source
        assert torch.allclose(s.boxes, torch.tensor([b.box for b in rec.boxes]).float())


def test_affine_moves_boxes_with_the_image() -> None:
    image = torch.zeros(1, 128, 128)
    image[0, 40:60, 70:100] = 1.0  # rows 40-60, columns 70-100
    boxes = torch.tensor([[70.0, 40.0, 100.0, 60.0]])
    for seed in range(5):
        out, moved, keep = random_affine(
            image, boxes, torch.Generator().manual_seed(seed), max_scale=0.1, max_shift=0.1
        )
        assert bool(keep.all())
        ys, xs = torch.nonzero(out[0] > 0.5, as_tuple=True)
        found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        assert torch.allclose(found, moved[0], atol=1.5), (found, moved[0])
        # never mirrored: the bright block stays right of the centre line
        assert float(xs.float().mean()) > 64


def test_strong_augment_is_reproducible_and_keeps_labels(samples: list[Sample]) -> None:
    s = samples[0]
    a = strong_augment(s, sample_generator(1, 2, 3))
    b = strong_augment(s, sample_generator(1, 2, 3))
    c = strong_augment(s, sample_generator(1, 2, 4))
    assert torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes)
    assert not torch.equal(a.image, c.image)
    assert a.labels.shape[0] == a.boxes.shape[0] <= s.boxes.shape[0]


def test_burn_in_lowers_the_supervised_loss(samples: list[Sample]) -> None:
    torch.manual_seed(0)
    model = D2RNet(CFG)
    images = torch.stack([s.image for s in samples[:4]])
    targets = [{"boxes": s.boxes, "labels": s.labels} for s in samples[:4]]
    before = _loss(model, images, targets)
    config = DetectorTrainConfig(
        burn_in_steps=12, batch_size=4, lr=2e-3, warmup_steps=2, augment_labeled=False, seed=1
    )
    kept = train_detector(model, samples[:4], [], config)
    assert kept is model  # no teacher-student stage: the student is kept
    after = _loss(model, images, targets)
    assert after < before * 0.8, (before, after)


def test_ema_update() -> None:
    teacher, student = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    assert teacher.running_mean is not None and student.running_mean is not None
    assert student.num_batches_tracked is not None and teacher.num_batches_tracked is not None
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
        student.running_mean.fill_(2.0)
        student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.75)
    assert torch.allclose(teacher.weight, torch.full((3,), 1.5))
    assert torch.allclose(teacher.running_mean, torch.full((3,), 0.5))
    assert int(teacher.num_batches_tracked) == 7


def test_teacher_student_step_lowers_the_pseudo_label_loss(samples: list[Sample]) -> None:
    torch.manual_seed(0)
    model = D2RNet(CFG)
    burn = DetectorTrainConfig(
        burn_in_steps=6, batch_size=4, lr=2e-3, warmup_steps=1, augment_labeled=False, seed=2
    )
    train_detector(model, samples[:4], [], burn)
    unlabeled = [
        replace(s, boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
        for s in samples[4:8]
    ]
    teacher = copy.deepcopy(model).eval()
    images = torch.stack([s.image for s in unlabeled])
    # a low threshold so that the young teacher yields pseudo-boxes at all
    pseudo = pseudo_targets(teacher, images, 0.05, max_boxes=5)
    assert all(len(p["boxes"]) > 0 for p in pseudo)
    targets = [{"boxes": p["boxes"], "labels": p["labels"]} for p in pseudo]
    before = _loss(model, images, targets)
    semi = DetectorTrainConfig(
        burn_in_steps=0,
        semi_steps=8,
        batch_size=2,
        unlabeled_batch_size=4,
        lr=2e-3,
        warmup_steps=1,
        threshold=0.05,
        keep_rate=0.9996,
        unsup_weight=4.0,
        seed=3,
    )
    kept = train_detector(model, samples[:2], unlabeled, semi)
    assert kept is not model  # the EMA teacher is kept
    after = _loss(model, images, targets)
    assert after < before, (before, after)
    # keep rate 0.9996: after 8 steps the teacher has barely moved from its start
    for (name, t), s in zip(
        kept.detector.state_dict().items(), teacher.detector.state_dict().values(), strict=True
    ):
        if t.dtype.is_floating_point:
            assert torch.allclose(t, s, atol=0.05), name


def test_pseudo_label_outputs(samples: list[Sample], phantom: Path) -> None:
    torch.manual_seed(0)
    model = D2RNet(CFG).eval()
    dets = pseudo_label(model, samples[:3], threshold=0.0)
    assert set(dets) == {s.id for s in samples[:3]}
    for found in dets.values():
        assert found == sorted(found, key=lambda f: -f[1])
        for _, score, (x0, y0, x1, y1) in found:
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128 and 0 <= score <= 1
    coco = coco_results(dets, samples[:3])
    assert len(coco["categories"]) == 22 and len(coco["images"]) == 3
    assert len(coco["annotations"]) == sum(len(v) for v in dets.values())
    data = json.loads((phantom / "annotation.json").read_text())
    sizes = {s.id: (128, 128) for s in samples}
    labelled = annotate_entries(data, dets, sizes)
    entry = next(e for e in labelled["train"] if e["id"] == samples[0].id)
    assert len(entry["boxes"]) == len(entry["labels"]) == len(entry["scores"])
    assert entry["boxes"] == [
        [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
        for _, _, (x0, y0, x1, y1) in dets[samples[0].id]
    ]


@pytest.mark.slow
def test_cli_train_detector_then_pseudo_label(phantom: Path, tmp_path: Path) -> None:
    d2r = [sys.executable, "-m", "cli.main"]
    det = tmp_path / "det"
    done = subprocess.run(
        [
            *d2r,
            "train-detector",
            "--data",
            str(phantom),
            "--unlabeled",
            str(phantom),
            "--out",
            str(det),
            "--burn-in-steps",
            "2",
            "--semi-steps",
            "1",
            "--batch-size",
            "2",
            "--unlabeled-batch-size",
            "2",
            "--min-frequency",
            "1",
            "--threshold",
            "0.0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (det / "detector_metrics.csv").is_file()
    out, coco = tmp_path / "annotation.json", tmp_path / "coco.json"
    done = subprocess.run(
        [
            *d2r,
            "pseudo-label",
            "--detector",
            str(det),
            "--annotation",
            str(phantom / "annotation.json"),
            "--out",
            str(out),
            "--coco",
            str(coco),
            "--threshold",
            "0.0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert all("scores" in e and e["height"] == e["width"] == 128 for e in data["train"])
    assert json.loads(coco.read_text())["annotations"]


def test_narrow_backbones_of_the_small_preset() -> None:
    from model.config import ModelConfig, is_backbone_name
    from model.errors import ModelConfigError
    from model.modeling import count_parameters

    assert is_backbone_name("resnet18_w32") and is_backbone_name("resnet101")
    assert not is_backbone_name("resnet18_w30") and not is_backbone_name("resnet12_w32")
    with pytest.raises(ModelConfigError, match="^detector_backbone"):
        ModelConfig.from_dict({**SMALL.to_dict(), "detector_backbone": "resnet12_w32"})
    model = D2RNet(SMALL.replace(vocab_size=58))
    # about 6 M parameters: an fp32 checkpoint stays under 30 MB
    assert 5e6 < count_parameters(model) < 7e6
    trunk = model.detector.fcos.backbone.body
    assert [trunk[f"layer{i}"][-1].conv2.out_channels for i in range(1, 5)] == [32, 64, 128, 256]
