"""Pytest fixtures for the real-peer harnesses.

Import them into a ``conftest.py`` to use them::

    from tests.support.fixtures import orthanc, orthanc_factory  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.orthanc import OrthancServer, find_dicomweb_plugin, find_orthanc

OrthancFactory = Callable[..., OrthancServer]


def _require_orthanc(dicomweb: bool) -> None:
    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed (Debian package 'orthanc')")
    if dicomweb and find_dicomweb_plugin() is None:
        pytest.skip("DICOMweb plugin is not installed (Debian package 'orthanc-dicomweb')")


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancFactory]:
    """Start Orthanc servers on demand; every one is stopped at teardown.

    Call it with :class:`OrthancServer`'s keyword arguments, e.g.
    ``orthanc_factory(dicomweb=True, modalities={"node": ("D2R", "127.0.0.1", port)})``.
    """
    servers: list[OrthancServer] = []

    def start(**kwargs: Any) -> OrthancServer:
        _require_orthanc(bool(kwargs.get("dicomweb", False)))
        server = OrthancServer(tmp_path_factory.mktemp("orthanc"), **kwargs)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in reversed(servers):
            server.stop(graceful=False)  # throw-away storage: no need to wait ~3 s


@pytest.fixture
def orthanc(orthanc_factory: OrthancFactory) -> OrthancServer:
    """A running Orthanc with default settings (no plugins)."""
    return orthanc_factory()
