"""The shared kernel: its examples run, its box geometry holds, and it stays a leaf."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import d2r_core
from d2r_core.errors import ConfigError, D2RError
from d2r_core.geometry import iou

MODULES = [m.name for m in pkgutil.iter_modules(d2r_core.__path__, "d2r_core.")]


@pytest.mark.parametrize("name", MODULES)
def test_examples_in_docstrings_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0


def test_iou() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0


def test_every_package_error_is_a_d2r_error() -> None:
    from delivery.errors import DeliveryError
    from dicom_node.errors import NodeError
    from model.errors import ModelConfigError, ModelError
    from report.errors import ReportError
    from training.errors import TrainingError
    from trt_build.errors import TrtBuildError
    from worker.errors import WorkerError

    for root in (
        DeliveryError,
        NodeError,
        ModelError,
        ReportError,
        TrainingError,
        TrtBuildError,
        WorkerError,
    ):
        assert issubclass(root, D2RError), root
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ModelConfigError, ValueError)


def test_config_error_names_the_setting() -> None:
    err = ConfigError("D2R_PORT", "port must be in 1..65535, got 0")
    assert str(err) == "D2R_PORT: port must be in 1..65535, got 0"
    assert err.setting == "D2R_PORT"
