"""Report-generator training: loss goes down, exact resume, config resolution, DDP with gloo."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import load_checkpoint
from model.tokenizer import BOS_ID, PAD_ID, Tokenizer
from training.data import collate_reports, prepare_samples
from training.errors import TrainingError
from training.phantom_output import PhantomConfig, generate
from training.train import (
    TextEncoding,
    TrainConfig,
    TrainModule,
    build_alignment,
    build_model,
    draw_learning_curve,
    observation_labels,
    read_records,
    train,
)

REPO = Path(__file__).resolve().parents[2]
#: a 128 px model keeps every step in the tens of milliseconds on a CPU
TINY = {"image_size": 128, "max_tokens": 40}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "p"
    generate(PhantomConfig(studies=14, seed=31, size=128, dicom_size=0), out)
    return out


def _config(phantom: Path, out: Path, **changes: object) -> TrainConfig:
    values: dict[str, object] = {
        "data": str(phantom),
        "out": str(out),
        "model": TINY,
        "epochs": 2,
        "batch_size": 4,
        "min_frequency": 1,
        "lr": 5e-4,
        "val_beam_size": 1,
        "max_val": 2,
        "progress": False,
        "seed": 5,
    }
    values.update(changes)
    return TrainConfig.from_dict(values)


def test_a_few_steps_lower_the_loss(phantom: Path, tmp_path: Path) -> None:
    config = _config(phantom, tmp_path)
    records = read_records(phantom)
    tok = Tokenizer.build(
        [(r.findings, r.impression) for r in records if r.split == "train"], min_frequency=1
    )
    model = build_model(config, tok)
    align, text_enc = build_alignment(model.config, tok, config)
    module = TrainModule(model, align, train_detector=True)
    samples = prepare_samples(
        [r for r in records if r.split == "train"][:4], 128, tok, max_tokens=40
    )
    batch = collate_reports(list(enumerate(samples)), model.config.num_boxes)
    text = text_enc(batch["tokens"], batch["findings"], batch["impressions"])
    opt = torch.optim.Adam(module.parameters(), lr=5e-4, amsgrad=True)
    module.train()
    first = {k: float(v.detach()) for k, v in module(batch, text).items()}
    assert set(first) == {"lm", "lab", "gab", "det", "loss"}
    for _ in range(8):
        losses = module(batch, text)
        opt.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_value_(module.parameters(), 0.1)
        opt.step()
    last = {k: float(v.detach()) for k, v in module(batch, text).items()}
    assert all(torch.isfinite(torch.tensor(list(last.values()))))
    assert last["lm"] < first["lm"] - 0.2
    assert last["loss"] < first["loss"]


def test_observation_loss_trains_the_observation_head(phantom: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="^observation_weight"):
        train(_config(phantom, tmp_path / "no-token", observation_weight=1.0))
    with pytest.raises(ValueError, match="^observation_weight"):
        _config(phantom, tmp_path, observation_weight=-1.0)
    config = _config(
        phantom, tmp_path / "run", model={**TINY, "global_token": True}, observation_weight=1.0
    )
    records = [r for r in read_records(phantom) if r.split == "train"][:4]
    tok = Tokenizer.build([(r.findings, r.impression) for r in records], min_frequency=1)
    model = build_model(config, tok)
    module = TrainModule(model, None, train_detector=False, observation_weight=1.0)
    samples = prepare_samples(records, 128, tok, max_tokens=model.config.max_tokens)
    batch = collate_reports(list(enumerate(samples)), 4)
    batch["observations"] = observation_labels(batch["findings"])
    assert batch["observations"].shape == (4, 14) and batch["observations"].max() == 1
    losses = module(batch, None)
    assert set(losses) == {"lm", "obs", "loss"}
    torch.testing.assert_close(losses["loss"], losses["lm"] + losses["obs"])
    losses["obs"].backward()
    summary = model.visual.global_branch.summary
    assert summary is not None
    last = summary[-1]
    assert isinstance(last, torch.nn.Linear) and last.weight.grad is not None
    assert float(last.weight.grad.abs().sum()) > 0  # the labels reach the image side
    head = model.visual.global_branch.observations.weight.clone()
    final = train(config)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert all(float(r["train_obs"]) > 0 for r in rows)
    saved = load_checkpoint(final).model.visual.global_branch.observations.weight
    assert saved.shape == head.shape == (14, model.config.visual_dim)
    assert not torch.equal(saved, head)


def test_text_encoding_splits_sentences() -> None:
    tok = Tokenizer.build(
        [("The heart is normal. Lungs are clear.", "No acute disease.")], min_frequency=1
    )
    ids = torch.tensor([tok.encode("The heart is normal. Lungs are clear.", "No acute disease.")])
    report, mask, sentences, sentence_mask = TextEncoding(tok)(ids, [""], [""])
    assert torch.equal(report, ids) and bool(mask.all())
    period = tok.token_to_id["."]
    # three sentences, each starting with BOS and ending with the period token
    assert sentences.shape[:2] == (1, 3)
    for row, m in zip(sentences[0], sentence_mask[0], strict=True):
        n = int(m.sum())
        assert row[0] == BOS_ID and row[n - 1] == period and bool((row[n:] == PAD_ID).all())


def test_run_writes_outputs_and_checkpoint(phantom: Path, tmp_path: Path) -> None:
    final = train(_config(phantom, tmp_path / "run", epochs=2))
    ckpt = load_checkpoint(final)
    assert ckpt.info.name == "d2r-net" and "phantom" in ckpt.info.training_data
    assert "synthetic" in ckpt.info.training_data
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["val_bleu4"]) <= 1.0 for r in rows)
    assert all(0.0 <= float(r["val_ce_f1"]) <= 1.0 for r in rows)
    resolved = json.loads((tmp_path / "run" / "config.resolved.json").read_text())
    assert resolved["train"]["lr"] == 5e-4 and resolved["model"]["image_size"] == 128
    assert resolved["train"]["grad_clip_value"] == 0.1 and resolved["train"]["amsgrad"] is True
    png = tmp_path / "run" / "learning_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vocab = json.loads((tmp_path / "run" / "vocab.json").read_text())
    assert vocab == json.loads((final / "vocab.json").read_text())


def test_resume_continues_exactly(phantom: Path, tmp_path: Path) -> None:
    # 6 steps straight vs 3 steps, a restart from the saved state, 3 more steps;
    # 3 steps end mid-epoch (3 batches of 4 per epoch would end it), so the sampler
    # position, optimizer, scheduler and RNG states must all come back
    straight = _config(phantom, tmp_path / "a", epochs=3, max_steps=6, max_val=1)
    train(straight)
    half = _config(phantom, tmp_path / "b", epochs=3, max_steps=4, max_val=1)
    train(half)
    state = torch.load(tmp_path / "b" / "state" / "last.pt", weights_only=True)
    assert state["progress"]["global_step"] == 4 and state["progress"]["step_in_epoch"] == 1
    train(_config(phantom, tmp_path / "b", epochs=3, max_steps=6, max_val=1), resume=True)
    a = torch.load(tmp_path / "a" / "state" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "state" / "last.pt", weights_only=True)
    assert a["progress"]["global_step"] == b["progress"]["global_step"] == 6
    for key, value in a["module"].items():
        assert torch.equal(value, b["module"][key]), key
    wa = load_file(str(tmp_path / "a" / "model" / "weights.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_state_fails(phantom: Path, tmp_path: Path) -> None:
    from training.errors import TrainingError

    with pytest.raises(TrainingError, match="no training state"):
        train(_config(phantom, tmp_path / "none"), resume=True)


def test_config_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match="^bogus: unknown training setting"):
        TrainConfig.from_dict({"data": "d", "out": "o", "bogus": 1})
    with pytest.raises(ValueError, match="^epochs"):
        TrainConfig(data="d", out="o", epochs=0)


def test_cli_flags_override_config_file(tmp_path: Path) -> None:
    from cli.commands.train import resolve
    from cli.main import build_parser

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: somewhere\nout: there\nepochs: 7\nlr: 0.001\n")
    args = build_parser().parse_args(
        ["train", "--config", str(cfg), "--epochs", "3", "--no-amp", "--augment"]
    )
    values = resolve(args)
    assert values["epochs"] == 3 and values["lr"] == 0.001 and values["data"] == "somewhere"
    assert values["amp"] is False and values["augment"] is True
    TrainConfig.from_dict(values)


def test_learning_curve_without_matplotlib(tmp_path: Path) -> None:
    rows = [{"epoch": i, "train_loss": 5.0 / i, "val_bleu4": 0.1 * i} for i in range(1, 5)]
    draw_learning_curve(rows, tmp_path / "c.png")
    from PIL import Image

    with Image.open(tmp_path / "c.png") as im:
        assert im.size[0] >= 300 and len(set(im.getdata())) > 2


@pytest.mark.slow
def test_ddp_two_gloo_processes(phantom: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "cli.main",
        "train",
        "--data",
        str(phantom),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--min-frequency",
        "1",
        "--max-val",
        "1",
        "--val-beam-size",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model": TINY}))
    done = subprocess.run(
        [*cmd, "--config", str(cfg)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = json.loads((out / "config.resolved.json").read_text())
    assert resolved["world_size"] == 2
    state = torch.load(out / "state" / "last.pt", weights_only=True)
    # the DistributedSampler pads the train split to a multiple of 2 ranks; batch 2 per rank
    n_train = sum(1 for r in read_records(phantom) if r.split == "train")
    per_rank = math.ceil(n_train / 2)
    assert state["progress"]["global_step"] == math.ceil(per_rank / 2)
    assert len(state["rng"]) == 2
    assert load_checkpoint(out / "model").config.image_size == 128


def test_shipped_example_config_is_valid() -> None:
    from training.train import read_config_file

    values = read_config_file(REPO / "training" / "configs" / "phantom-small.json")
    config = TrainConfig.from_dict(values)
    assert config.preset == "small" and config.grad_clip_value == 0.1 and config.amsgrad


def test_global_branch_starts_from_the_detector_and_half_checkpoint(
    phantom: Path, tmp_path: Path
) -> None:
    from model.checkpoint import save_checkpoint

    records = read_records(phantom)
    tok = Tokenizer.build([(r.findings, r.impression) for r in records], min_frequency=1)
    tiny = {**TINY, "global_backbone": "resnet10_w32", "detector_backbone": "resnet10_w32"}
    torch.manual_seed(3)
    source = build_model(_config(phantom, tmp_path, model=tiny), tok)
    det_dir = save_checkpoint(
        source, tok, tmp_path / "det", name="d", version="0", training_data="test"
    )
    config = _config(
        phantom, tmp_path, model=tiny, init_detector=str(det_dir), init_global_from_detector=True
    )
    model = build_model(config, tok)
    trunk = dict(model.visual.global_branch.trunk.named_parameters())
    body = dict(source.detector.fcos.backbone.body.named_parameters())
    assert torch.equal(trunk["0.weight"], body["conv1.weight"])  # conv1
    assert torch.equal(trunk["7.0.conv2.weight"], body["layer4.0.conv2.weight"])
    half = save_checkpoint(
        model, tok, tmp_path / "half", name="h", version="0", training_data="test", half=True
    )
    full = save_checkpoint(
        model, tok, tmp_path / "full", name="f", version="0", training_data="test"
    )
    assert (half / "weights.safetensors").stat().st_size < 0.6 * (
        full / "weights.safetensors"
    ).stat().st_size
    loaded = load_checkpoint(half).model
    w = loaded.decoder.out.weight
    assert w.dtype == torch.float32
    assert torch.allclose(w, model.decoder.out.weight, atol=1e-3)
    mismatch = _config(
        phantom, tmp_path, model=TINY, init_detector=str(det_dir), init_global_from_detector=True
    )
    from training.errors import TrainingError

    with pytest.raises(TrainingError, match="init_global_from_detector"):
        build_model(mismatch, tok)


def test_detector_boxes_and_frozen_trunk(phantom: Path, tmp_path: Path) -> None:
    from model.checkpoint import save_checkpoint
    from training.train import precompute_frozen

    records = read_records(phantom)
    tok = Tokenizer.build([(r.findings, r.impression) for r in records], min_frequency=1)
    tiny = {**TINY, "global_backbone": "resnet10_w32", "detector_backbone": "resnet10_w32"}
    torch.manual_seed(4)
    source = build_model(_config(phantom, tmp_path, model=tiny), tok)
    with torch.no_grad():  # a detector that fires everywhere: every image gets K boxes
        source.detector.fcos.head.classification_head.cls_logits.bias.fill_(4.0)
    det_dir = save_checkpoint(
        source, tok, tmp_path / "det", name="d", version="0", training_data="test"
    )
    with pytest.raises(ValueError, match="^generator_boxes"):
        _config(phantom, tmp_path, generator_boxes="detector")  # no detector to read boxes from
    with pytest.raises(ValueError, match="^generator_boxes"):
        _config(phantom, tmp_path, generator_boxes="somewhere")
    config = _config(
        phantom,
        tmp_path / "run",
        model=tiny,
        init_detector=str(det_dir),
        init_global_from_detector=True,
        generator_boxes="detector",
        freeze_global_trunk=4,
        epochs=1,
    )
    model = build_model(config, tok)
    samples = prepare_samples([r for r in records if r.split == "train"][:3], 128, tok)
    frozen = precompute_frozen(
        model, samples, boxes=True, trunk_stages=4, device=torch.device("cpu"), batch_size=2
    )
    assert frozen.boxes is not None and frozen.trunk is not None
    boxes, mask, scores = frozen.boxes
    with torch.no_grad():
        images = torch.stack([s.image for s in samples])
        expected = model.generator_boxes(images)
        trunk = model.visual.global_branch.trunk.eval()(model.stem(images))
    assert bool(mask.all())
    torch.testing.assert_close(boxes, expected[0])  # batched in twos: float-level differences
    torch.testing.assert_close(scores, expected[2])
    assert scores.shape == (3, model.config.num_boxes, 22) and bool((scores.sum(-1) > 0).all())
    torch.testing.assert_close(frozen.trunk, trunk)
    before = {k: v.clone() for k, v in model.visual.global_branch.trunk.state_dict().items()}
    final = train(config)
    after = load_checkpoint(final).model.visual.global_branch.trunk.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included
    trained = load_checkpoint(final).model.visual.global_branch.proj.weight
    assert not torch.equal(trained, model.visual.global_branch.proj.weight)


def test_validation_ce_f1_selects_on_findings() -> None:
    from training.train import ce_f1

    refs = [
        "There is a small left pleural effusion.",
        "The heart is enlarged.",
        "Small right pneumothorax.",
        "The lungs are clear.",
    ]
    perfect = ce_f1(refs, refs)
    normal = ce_f1(refs, ["The lungs are clear."] * len(refs))
    # macro over the 14 observations: the 4 present (incl. No Finding) score 1, the rest 0
    assert perfect == pytest.approx(4 / 14)
    assert normal < perfect
    with pytest.raises(ValueError, match="^select_metric"):
        TrainConfig.from_dict({"data": "d", "out": "o", "select_metric": "rouge"})
