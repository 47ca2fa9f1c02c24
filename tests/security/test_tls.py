"""DICOM TLS on the listener and the sender, against dcmtk's TLS-enabled storescu and storescp.

The CA and certificates are made by the test with the ``openssl`` command.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from d2r_core.config import TlsSettings
from d2r_core.errors import ConfigError
from delivery.destinations import DicomPeer
from delivery.dimse import SendOptions, send_datasets
from delivery.errors import TransientSendError
from delivery.settings import DeliverySettings
from dicom_node.settings import NodeSettings
from studydb.store import StudyStore
from tests.security.listener import running_listener, store_statuses, storescu
from tests.security.tls_ca import Pki, make_test_ca
from tests.support.dicom_files import make_dx
from tests.support.listener_process import lone_listener_process
from tests.support.processes import Process, free_port, wait_port

pytestmark = pytest.mark.integration

STORESCP = "/usr/bin/storescp"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_ca(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_ca(tmp_path_factory.mktemp("pki-other"), name="rogue")


def _tls_env(ca: Pki, *, require: bool) -> dict[str, str]:
    return {
        "D2R_TLS_CERT": str(ca.server.cert),
        "D2R_TLS_KEY": str(ca.server.key),
        "D2R_TLS_CA": str(ca.ca),
        "D2R_TLS_REQUIRE_CLIENT_CERT": "true" if require else "false",
    }


def test_tls_settings_are_validated(ca: Pki, tmp_path: Path) -> None:
    env = {**_tls_env(ca, require=True), "D2R_DESTINATIONS": "PACS@h:2762"}
    s = NodeSettings.from_env(env)
    assert s.tls.listener_enabled and s.tls.require_client_cert
    d = DeliverySettings.from_env({**env, "D2R_DESTINATIONS_TLS": "1"})
    (peer,) = d.destinations
    assert isinstance(peer, DicomPeer) and peer.tls and peer.name == "tls://PACS@h:2762"
    assert d.tls == s.tls
    mixed = DeliverySettings.from_env({"D2R_DESTINATIONS": "A@h:104,dicom+tls://B@h:2762"})
    mixed_peers = [p for p in mixed.destinations if isinstance(p, DicomPeer)]
    assert [p.tls for p in mixed_peers] == [False, True]
    cases = {
        "D2R_TLS_KEY": {"D2R_TLS_CERT": str(ca.server.cert)},
        "D2R_TLS_CA": {"D2R_TLS_CA": str(tmp_path / "missing.pem")},
        "D2R_TLS_REQUIRE_CLIENT_CERT": {
            "D2R_TLS_CERT": str(ca.server.cert),
            "D2R_TLS_KEY": str(ca.server.key),
            "D2R_TLS_REQUIRE_CLIENT_CERT": "yes",
        },
    }
    for setting, env in cases.items():
        with pytest.raises(ConfigError) as info:
            NodeSettings.from_env(env)
        assert info.value.setting == setting
    with pytest.raises(ConfigError) as info:
        DeliverySettings.from_env({"D2R_DESTINATIONS": "https://PACS@h:443"})
    assert info.value.setting == "D2R_DESTINATIONS"


def test_listener_accepts_a_tls_store_with_a_client_certificate(
    ca: Pki, other_ca: Pki, tmp_path: Path
) -> None:
    image = tmp_path / "dx.dcm"
    ds = make_dx(image, rows=64, cols=48)
    with running_listener(tmp_path, **_tls_env(ca, require=True)) as node:
        tls = ("+tls", str(ca.client.key), str(ca.client.cert), "+cf", str(ca.ca))
        res = storescu(node.port, image, flags=tls)
        assert res.returncode == 0, res.stdout + res.stderr
        assert store_statuses(res) == [0x0000]
        (record,) = node.store.instances(ds.StudyInstanceUID)
        assert pydicom.dcmread(record.path).SOPInstanceUID == ds.SOPInstanceUID

        # no client certificate: the handshake fails, nothing is stored
        anonymous = storescu(node.port, image, flags=("+tla", "+cf", str(ca.ca)))
        assert anonymous.returncode != 0
        assert store_statuses(anonymous) == []
        # a certificate from a CA we do not trust
        rogue = ("+tls", str(other_ca.client.key), str(other_ca.client.cert), "+cf", str(ca.ca))
        assert storescu(node.port, image, flags=rogue).returncode != 0
        # plain DICOM on the TLS port
        assert storescu(node.port, image).returncode != 0
        # and the listener keeps serving good clients
        again = storescu(node.port, image, flags=tls)
        assert again.returncode == 0 and store_statuses(again) == [0x0000]
        assert len(node.store.instances(ds.StudyInstanceUID)) == 1


def test_listener_without_client_certificate_requirement(ca: Pki, tmp_path: Path) -> None:
    image = tmp_path / "dx.dcm"
    make_dx(image, rows=64, cols=48)
    with running_listener(tmp_path, **_tls_env(ca, require=False)) as node:
        res = storescu(node.port, image, flags=("+tla", "+cf", str(ca.ca)))
        assert res.returncode == 0, res.stdout + res.stderr
        assert store_statuses(res) == [0x0000]
        # the client still verifies us: a client trusting another CA refuses the node
        assert (
            storescu(node.port, image, flags=("+tla", "+cf", str(ca.client.cert))).returncode != 0
        )


@pytest.fixture
def tls_storescp(ca: Pki, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = Process(
        [
            STORESCP,
            "+tls",
            str(ca.server.key),
            str(ca.server.cert),
            "+cf",
            str(ca.ca),
            "-aet",
            "TLSPACS",
            "-od",
            str(out),
            str(port),
        ],  # fmt: skip
        env={},
        log=tmp_path / "storescp.log",
    )
    try:
        wait_port(port)
        yield port, out
    finally:
        proc.stop()


def test_sender_delivers_to_a_tls_storescp(
    ca: Pki, other_ca: Pki, tls_storescp: tuple[int, Path]
) -> None:
    port, out = tls_storescp
    ds = make_dx(None, rows=32, cols=32)
    destination = DicomPeer("TLSPACS", "127.0.0.1", port, tls=True)
    options = SendOptions(
        acse_timeout=5,
        dimse_timeout=10,
        network_timeout=10,
        tls=TlsSettings(cert=ca.client.cert, key=ca.client.key, ca=ca.ca),
    )
    assert send_datasets([ds], destination, ae_title="D2R", options=options) == [0x0000]
    (received,) = list(out.iterdir())
    assert pydicom.dcmread(received).SOPInstanceUID == ds.SOPInstanceUID

    # a server certificate we cannot verify, or no client certificate: transient, never success
    untrusted = SendOptions(
        acse_timeout=5,
        network_timeout=5,
        tls=TlsSettings(cert=ca.client.cert, key=ca.client.key, ca=other_ca.ca),
    )
    with pytest.raises(TransientSendError):
        send_datasets([ds], destination, ae_title="D2R", options=untrusted)
    no_client_cert = SendOptions(acse_timeout=5, network_timeout=5, tls=TlsSettings(ca=ca.ca))
    with pytest.raises(TransientSendError):
        send_datasets([ds], destination, ae_title="D2R", options=no_client_cert)
    # plain DICOM to the TLS port does not silently succeed either
    with pytest.raises(TransientSendError):
        send_datasets(
            [ds],
            DicomPeer("TLSPACS", "127.0.0.1", port),
            ae_title="D2R",
            options=SendOptions(acse_timeout=5, network_timeout=5),
        )
    assert len(list(out.iterdir())) == 1


def test_the_tls_peer_refuses_plain_dicom(tls_storescp: tuple[int, Path]) -> None:
    port, _ = tls_storescp
    res = subprocess.run(
        ["/usr/bin/echoscu", "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30
    )
    assert res.returncode != 0  # so the deliveries above really went over TLS


def test_a_further_listener_process_speaks_tls_too(ca: Pki, tmp_path: Path) -> None:
    """``D2R_LISTENER_PROCESSES``: a process that inherits the port wraps its connections in
    TLS with the same settings, and refuses plain DICOM as the node does."""
    image = tmp_path / "dx.dcm"
    ds = make_dx(image, rows=64, cols=48)
    env = {"D2R_AE_TITLE": "D2RSEC", **_tls_env(ca, require=True)}
    with lone_listener_process(tmp_path, env=env) as lone:
        tls = ("+tls", str(ca.client.key), str(ca.client.cert), "+cf", str(ca.ca))
        res = storescu(lone.port, image, flags=tls)
        assert res.returncode == 0, res.stdout + res.stderr
        assert store_statuses(res) == [0x0000]
        plain = storescu(lone.port, image)
        assert plain.returncode != 0 and store_statuses(plain) == []
    store = StudyStore(lone.database)  # recorded before the Success went out
    try:
        (record,) = store.instances(ds.StudyInstanceUID)
        assert pydicom.dcmread(record.path).SOPInstanceUID == ds.SOPInstanceUID
    finally:
        store.close()
