"""The signed-report listener's settings."""

from __future__ import annotations

import pytest

from d2r_core.errors import ConfigError
from feedback.settings import FeedbackSettings


def test_the_listener_is_off_by_default_and_reads_its_limits() -> None:
    assert FeedbackSettings.from_env({}).port == 0
    settings = FeedbackSettings.from_env(
        {"D2R_HL7_LISTEN_PORT": "2575", "D2R_HL7_MAX_MESSAGE_BYTES": "4096"}
    )
    assert (settings.port, settings.max_message_bytes) == (2575, 4096)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"D2R_HL7_LISTEN_PORT": "70000"}, "D2R_HL7_LISTEN_PORT"),
        ({"D2R_HL7_MAX_MESSAGE_BYTES": "10"}, "D2R_HL7_MAX_MESSAGE_BYTES"),
        ({"D2R_HL7_IDLE_SECONDS": "0"}, "D2R_HL7_IDLE_SECONDS"),
        ({"D2R_HL7_LISTEN_TLS": "true"}, "D2R_HL7_LISTEN_TLS"),
    ],
)
def test_an_invalid_setting_is_named(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        FeedbackSettings.from_env(env)
