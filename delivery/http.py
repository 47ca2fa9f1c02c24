"""What the HTTP senders share: the :mod:`requests` session with credentials and TLS, and the
classification of HTTP answers.

Credentials come from files named in the destination address (``token_file``: a bearer
token; ``basic_auth_file``: ``user:password``), read when the sender is opened; they never
appear in an error message or a log line, and go over plain ``http://`` only where the address
says ``insecure=true`` (:class:`~delivery.destinations.HttpEndpoint`). TLS verifies the server
against ``D2R_TLS_CA``, else the system store, and presents ``D2R_TLS_CERT``/``D2R_TLS_KEY`` as
the client certificate when both are set. An answer is read into memory only up to
:data:`MAX_ANSWER_BYTES` (after content decoding): a larger one fails the request as an
:class:`AnswerTooLarge`, a transient error like any other failed request.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import requests

from d2r_core.config import TlsSettings, refuse_placeholder
from d2r_core.errors import ConfigError
from delivery.destinations import HttpEndpoint
from delivery.errors import PermanentSendError, TransientSendError

__all__ = [
    "MAX_ANSWER_BYTES",
    "TRANSIENT_STATUSES",
    "AnswerTooLarge",
    "describe",
    "http_error",
    "open_session",
    "read_secret",
]

#: Most bytes of an answer body read from an archive or FHIR server (a store response, an
#: OperationOutcome or a transaction-response is a few kilobytes).
MAX_ANSWER_BYTES = 8 * 1024 * 1024
#: HTTP statuses that ask to try again later (any 5xx counts too)
TRANSIENT_STATUSES = frozenset({408, 425, 429})

_SETTING = "D2R_DESTINATIONS"


def read_secret(path: Path, what: str) -> str:
    """The stripped content of a credential file; the error names the file, never its content.

    Raises
    ------
    ConfigError
        When the file cannot be read, is empty or still holds the ``CHANGE-ME`` placeholder.
    """
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            _SETTING, f"cannot read the {what} file {path}: {exc.__class__.__name__}"
        ) from None
    if not text:
        raise ConfigError(_SETTING, f"the {what} file {path} is empty")
    return refuse_placeholder(text, _SETTING, f"the {what} file {path}")


class AnswerTooLarge(requests.RequestException):
    """An answer body larger than :data:`MAX_ANSWER_BYTES`."""


class _Session(requests.Session):
    """A session whose ``verify`` wins (plain :mod:`requests` lets ``REQUESTS_CA_BUNDLE`` or
    ``CURL_CA_BUNDLE`` replace it on every request, which would silently drop ``D2R_TLS_CA``)
    and whose answers are read up to :data:`MAX_ANSWER_BYTES`."""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        kwargs["stream"] = True
        response = super().send(request, **kwargs)
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(64 * 1024):
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise AnswerTooLarge(
                        f"answer larger than {MAX_ANSWER_BYTES} bytes", response=response
                    )
                chunks.append(chunk)
        finally:
            response.close()
        # requests keeps a read body here; a streamed one is set the same way by iter_content
        response._content = b"".join(chunks)
        return response

    def merge_environment_settings(
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(
            url, proxies, stream, verify, cert
        )
        settings["verify"] = self.verify if verify is None else verify
        return settings


def trust(tls: TlsSettings) -> str | bool:
    """What verifies servers: ``D2R_TLS_CA``, else the system store as OpenSSL finds it (as for
    DICOM TLS; ``SSL_CERT_FILE``/``SSL_CERT_DIR`` apply), else requests' own bundle."""
    if tls.ca is not None:
        return str(tls.ca)
    paths = ssl.get_default_verify_paths()
    for found in (paths.cafile, paths.capath):
        if found and os.path.exists(found):
            return found
    return True


def open_session(endpoint: HttpEndpoint, tls: TlsSettings) -> requests.Session:
    """A session that authenticates to ``endpoint`` and verifies its certificate.

    Raises
    ------
    ConfigError
        When a credential file is unreadable, empty or malformed.
    """
    session = _Session()
    session.verify = trust(tls)
    if tls.cert is not None and tls.key is not None:
        session.cert = (str(tls.cert), str(tls.key))
    if endpoint.token_file is not None:
        token = read_secret(endpoint.token_file, "token")
        session.headers["Authorization"] = f"Bearer {token}"
    elif endpoint.basic_auth_file is not None:
        user, colon, password = read_secret(endpoint.basic_auth_file, "basic auth").partition(":")
        if not colon or not user:
            raise ConfigError(
                _SETTING, f"the basic auth file {endpoint.basic_auth_file} must hold user:password"
            )
        session.auth = (user, password)
    return session


def http_error(name: str, status: int, reason: str, detail: str = "") -> Exception:
    """The send error for an HTTP error status: transient for 408, 425, 429 and 5xx, else
    permanent with the status."""
    message = f"{name}: HTTP {status} {reason}".rstrip() + (f"; {detail}" if detail else "")
    if status in TRANSIENT_STATUSES or status >= 500:
        return TransientSendError(message)
    return PermanentSendError(message, status=status)


def describe(exc: requests.RequestException) -> str:
    """A short account of a failed request (class and message, at most 300 characters): the
    URL it names holds no credential, which never goes in a URL."""
    text = f"{exc.__class__.__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."
