from __future__ import annotations

import json

import pytest

from d2r_core.classes import VINDR_CLASSES
from model.config import PAPER, PRESETS, SMALL, ModelConfig, get_preset
from model.errors import ModelConfigError


def test_vindr_classes_exact() -> None:
    assert len(VINDR_CLASSES) == 22
    assert VINDR_CLASSES[0] == "Aortic enlargement"
    assert VINDR_CLASSES[8] == "Enlarged PA"
    assert VINDR_CLASSES[15] == "Nodule/Mass"
    assert VINDR_CLASSES[-1] == "Other lesion"
    assert len(set(VINDR_CLASSES)) == 22


def test_paper_preset_values() -> None:
    p = get_preset("paper")
    assert (p.global_backbone, p.image_size, p.d_model, p.visual_dim) == (
        "resnet101",
        384,
        512,
        1024,
    )
    assert (p.num_encoder_layers, p.num_decoder_layers, p.num_heads, p.d_ff) == (3, 3, 8, 512)
    assert (p.memory_slots, p.beam_size, p.max_tokens) == (3, 3, 100)
    assert set(PRESETS) == {"paper", "small"}


@pytest.mark.parametrize("cfg", [PAPER, SMALL])
def test_round_trip_through_json(cfg: ModelConfig) -> None:
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"d_model": "512"}, "d_model"),
        ({"image_size": 300}, "image_size"),
        ({"num_heads": 7}, "num_heads"),
        ({"crop_channels": [1, 2, 3]}, "crop_channels"),
        ({"box_score_threshold": 1.5}, "box_score_threshold"),
        ({"global_backbone": "vgg16"}, "global_backbone"),
        ({"no_repeat_trigram": "yes"}, "no_repeat_trigram"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_from_dict_names_the_bad_field(change: dict[str, object], field: str) -> None:
    data = {**SMALL.to_dict(), **change}
    with pytest.raises(ModelConfigError, match=f"^{field}:"):
        ModelConfig.from_dict(data)


def test_missing_field_named() -> None:
    data = SMALL.to_dict()
    del data["image_size"]
    with pytest.raises(ModelConfigError, match="^image_size: missing"):
        ModelConfig.from_dict(data)


def test_unknown_preset() -> None:
    with pytest.raises(ModelConfigError, match="preset"):
        get_preset("huge")
