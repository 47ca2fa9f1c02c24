"""NodeSettings: defaults, parsing and one named error per invalid setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2r_core.config import merged_environment, read_config_file
from d2r_core.errors import ConfigError, D2RError
from dicom_node.settings import NodeSettings


def test_defaults() -> None:
    s = NodeSettings.from_env({})
    assert (s.ae_title, s.host, s.port) == ("D2R", "0.0.0.0", 11112)
    assert s.spool_dir == Path("d2r-data/spool")
    assert s.database_url == "sqlite:///d2r-data/d2r.db"
    assert (s.study_quiet_seconds, s.study_force_seconds, s.reconcile_seconds) == (10, 600, 30)
    assert (s.max_pdu, s.max_associations, s.listener_processes) == (131072, 10, 1)
    assert (s.acse_timeout, s.dimse_timeout, s.network_timeout) == (30, 60, 60)
    assert (s.send_retries, s.send_retry_delay, s.min_free_bytes) == (5, 30, 1024**3)
    assert (s.stow_max_bytes, s.stow_max_concurrent) == (1024**3, 4)


def test_values_are_parsed() -> None:
    s = NodeSettings.from_env(
        {
            "D2R_AE_TITLE": " CXR_AI ",
            "D2R_PORT": "104",
            "D2R_SPOOL_DIR": "/srv/d2r/spool",
            "D2R_STUDY_QUIET_SECONDS": "2.5",
            "D2R_MAX_PDU": "0",
            "D2R_SEND_RETRY_DELAY": "3",
            "D2R_MIN_FREE_BYTES": "0",
            "D2R_STOW_MAX_BYTES": "1048576",
            "D2R_STOW_MAX_CONCURRENT": "2",
            "D2R_LISTENER_PROCESSES": "4",
        }
    )
    assert s.listener_processes == 4
    assert s.ae_title == "CXR_AI"
    assert (s.stow_max_bytes, s.stow_max_concurrent) == (1048576, 2)
    assert s.port == 104
    assert s.database_url == "sqlite:////srv/d2r/d2r.db"
    assert s.study_quiet_seconds == 2.5
    assert s.max_pdu == 0
    assert [s.retry_delay(n) for n in (1, 2, 3)] == [3, 6, 12]


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("D2R_AE_TITLE", "A" * 17),
        ("D2R_AE_TITLE", "BAD\\AE"),
        ("D2R_AE_TITLE", "BAD\tAE"),
        ("D2R_PORT", "http"),
        ("D2R_PORT", "70000"),
        ("D2R_DATABASE_URL", "d2r.db"),
        ("D2R_STUDY_QUIET_SECONDS", "0"),
        ("D2R_STUDY_FORCE_SECONDS", "nan"),
        ("D2R_STUDY_FORCE_SECONDS", "5"),  # below the quiet period
        ("D2R_RECONCILE_SECONDS", "-1"),
        ("D2R_MAX_PDU", "100"),
        ("D2R_MAX_ASSOCIATIONS", "0"),
        ("D2R_LISTENER_PROCESSES", "0"),
        ("D2R_LISTENER_PROCESSES", "65"),
        ("D2R_LISTENER_PROCESSES", "auto"),
        ("D2R_ACSE_TIMEOUT", "x"),
        ("D2R_DIMSE_TIMEOUT", "0"),
        ("D2R_NETWORK_TIMEOUT", "inf"),
        ("D2R_SEND_RETRIES", "-1"),
        ("D2R_SEND_RETRIES", "1.5"),
        ("D2R_SEND_RETRY_DELAY", "-3"),
        ("D2R_MIN_FREE_BYTES", "1GB"),
        ("D2R_STOW_MAX_BYTES", "0"),
        ("D2R_STOW_MAX_BYTES", "2GiB"),
        ("D2R_STOW_MAX_CONCURRENT", "0"),
    ],
)
def test_invalid_value_names_the_setting(setting: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        NodeSettings.from_env({setting: value})
    assert info.value.setting == setting
    message = str(info.value)
    assert message.startswith(f"{setting}: ")
    assert "\n" not in message
    assert isinstance(info.value, D2RError)


def test_database_url_password_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        NodeSettings.from_env({"D2R_DATABASE_URL": "user:secret@db/d2r"})
    assert "secret" not in str(info.value)


def test_read_config_file_and_environment_override(tmp_path: Path) -> None:
    cfg = tmp_path / "d2r.env"
    cfg.write_text(
        "# node settings\n"
        "\n"
        "D2R_AE_TITLE=FROMFILE\n"
        'D2R_PORT="11113"\n'
        "export D2R_HOST='127.0.0.1'\n"
        "  ; another comment\n"
        "D2R_DESTINATIONS = PACS@pacs:104\n",
        encoding="utf-8",
    )
    values = read_config_file(cfg)
    assert values == {
        "D2R_AE_TITLE": "FROMFILE",
        "D2R_PORT": "11113",
        "D2R_HOST": "127.0.0.1",
        "D2R_DESTINATIONS": "PACS@pacs:104",
    }
    merged = merged_environment(cfg, {"D2R_PORT": "4242", "PATH": "/bin"})
    s = NodeSettings.from_env(merged)
    assert (s.ae_title, s.host, s.port) == ("FROMFILE", "127.0.0.1", 4242)
    assert merged_environment(None, {"D2R_PORT": "1"}) == {"D2R_PORT": "1"}


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("D2R_PORT 104\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1"):
        read_config_file(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        read_config_file(tmp_path / "missing.env")


def test_settings_are_frozen() -> None:
    s = NodeSettings.from_env({})
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_attempts_and_claim_lease_settings() -> None:
    from worker.settings import WorkerSettings

    default = WorkerSettings.from_env({})
    assert (default.node.max_attempts, default.claim_lease_seconds) == (3, 30.0)
    assert default.claim_heartbeat_seconds == 10.0
    env = {
        "D2R_MAX_ATTEMPTS": "5",
        "D2R_CLAIM_LEASE_SECONDS": "12",
        "D2R_CLAIM_HEARTBEAT_SECONDS": "4",
    }
    custom = WorkerSettings.from_env(env)
    assert (custom.node.max_attempts, custom.claim_lease_seconds) == (5, 12.0)
    assert custom.claim_heartbeat_seconds == 4.0
    with pytest.raises(D2RError, match="D2R_CLAIM_HEARTBEAT_SECONDS"):
        WorkerSettings.from_env(
            {"D2R_CLAIM_LEASE_SECONDS": "10", "D2R_CLAIM_HEARTBEAT_SECONDS": "10"}
        )
    with pytest.raises(D2RError, match="D2R_MAX_ATTEMPTS"):
        NodeSettings.from_env({"D2R_MAX_ATTEMPTS": "0"})


def test_sr_roi_encoding_setting() -> None:
    from report.build import RoiEncoding
    from worker.settings import SR_ROI_ENCODINGS, WorkerSettings

    assert WorkerSettings.from_env({}).sr_roi_encoding == "tid1410"
    assert WorkerSettings.from_env({"D2R_SR_ROI_ENCODING": "TID1501"}).sr_roi_encoding == "tid1501"
    assert set(SR_ROI_ENCODINGS) == {e.value for e in RoiEncoding}
    with pytest.raises(D2RError, match="D2R_SR_ROI_ENCODING"):
        WorkerSettings.from_env({"D2R_SR_ROI_ENCODING": "tid1411"})


def test_report_choice_setting() -> None:
    from worker.settings import WorkerSettings

    assert WorkerSettings.from_env({}).report_choice == "consistent"
    assert WorkerSettings.from_env({"D2R_REPORT_CHOICE": "probable"}).report_choice == "probable"
    with pytest.raises(D2RError, match="D2R_REPORT_CHOICE"):
        WorkerSettings.from_env({"D2R_REPORT_CHOICE": "best"})


def test_worker_loads_the_model_with_the_report_choice() -> None:
    from report.grounding import most_consistent
    from worker.settings import BUNDLED_MODEL, WorkerSettings
    from worker.tasks import WorkerContext

    for choice, chooser in (("consistent", most_consistent), ("probable", None)):
        env = {"D2R_MODEL": str(BUNDLED_MODEL), "D2R_REPORT_CHOICE": choice}
        predictor = WorkerContext(WorkerSettings.from_env(env)).predictor
        assert predictor.choose_report is chooser
        assert predictor.beam_size == (5 if chooser else None)
        assert predictor.parameters[2] == (  # written into every SR as an algorithm parameter
            "report: chosen among a beam of 5 by report.grounding.most_consistent"
            if chooser
            else "report: the most probable of a beam of 3"
        )
