"""HTTP answers and credential files of the HTTP senders."""

from __future__ import annotations

from pathlib import Path

import pytest

from delivery.destinations import HttpEndpoint
from delivery.errors import PermanentSendError, TransientSendError
from delivery.http import http_error, open_session
from dicom_node.settings import ConfigError, TlsSettings


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_try_later_answers_are_transient(status: int) -> None:
    assert isinstance(http_error("x", status, "Later"), TransientSendError)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 412, 415, 422])
def test_other_client_errors_are_permanent_with_the_status(status: int) -> None:
    error = http_error("x", status, "No")
    assert isinstance(error, PermanentSendError) and error.status == status


def test_the_session_carries_the_token_and_verifies_against_the_ca(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    ca = tmp_path / "ca.pem"
    session = open_session(HttpEndpoint("fhir", "https://h", token_file=token), TlsSettings(ca=ca))
    assert session.headers["Authorization"] == "Bearer abc"
    assert session.verify == str(ca)
    system = open_session(HttpEndpoint("fhir", "https://h"), TlsSettings()).verify
    assert system is True or Path(str(system)).exists()


def test_an_empty_credential_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        open_session(HttpEndpoint("fhir", "https://h", token_file=empty), TlsSettings())


def test_the_configured_ca_wins_over_requests_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/elsewhere/bundle.pem")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/elsewhere/bundle.pem")
    ca = tmp_path / "ca.pem"
    session = open_session(HttpEndpoint("dicomweb", "https://h"), TlsSettings(ca=ca))
    merged = session.merge_environment_settings("https://h/x", {}, None, None, None)
    assert merged["verify"] == str(ca)
