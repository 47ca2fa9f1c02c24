"""``D2R_OUTPUTS``: the objects each study gets, validated when the settings are read."""

from __future__ import annotations

import pytest

from d2r_core.errors import ConfigError
from worker.settings import WorkerSettings


def test_the_default_is_both_srs_and_the_presentation_state() -> None:
    assert WorkerSettings.from_env({}).outputs == ("tid1500", "text", "gsps")


def test_a_list_in_any_order_and_case() -> None:
    settings = WorkerSettings.from_env({"D2R_OUTPUTS": " SC, gsps ,tid1500 "})
    assert settings.outputs == ("tid1500", "gsps", "sc")


@pytest.mark.parametrize("value", ["tid1500,pdf", "gsps,sc", ","])
def test_an_unknown_name_or_no_sr_is_one_line_naming_the_setting(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        WorkerSettings.from_env({"D2R_OUTPUTS": value})
    message = str(info.value)
    assert "D2R_OUTPUTS" in message and "\n" not in message
