"""The real listener on loopback, fed by dcmtk's echoscu/storescu, in every transfer syntax."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom.presentation import PresentationContext

from d2r_core import statuses
from dicom_node.scp import SharedSyntaxContext, build_ae
from dicom_node.selection import select_images
from dicom_node.spool import dataset_offset
from studydb.errors import DatabaseUnavailable
from studydb.records import InstanceRecord
from studydb.store import StudyStore
from tests.dicom_node.node_harness import Node, NodeFactory, Recorder
from tests.support.dicom_files import chest_pixels, make_dx, rg1_path

pytestmark = pytest.mark.integration

DCMTK = Path("/usr/bin")
if not (DCMTK / "storescu").exists():  # pragma: no cover - dcmtk missing
    pytest.skip("dcmtk is not installed", allow_module_level=True)

ROWS, COLS = 192, 160


def dcmtk(tool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [str(DCMTK / tool), *map(str, args)], capture_output=True, text=True, timeout=60
    )
    return res


def storescu(
    node: Node, *files: Path, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    aec = node.settings.ae_title
    return dcmtk("storescu", "-d", "-aec", aec, *flags, "127.0.0.1", str(node.port), *files)


def store_statuses(res: subprocess.CompletedProcess[str]) -> list[int]:
    """The DIMSE statuses of the C-STORE responses storescu received (from its ``-d`` log)."""
    out = res.stdout + res.stderr
    blocks = out.split("Received Store Response")[1:]
    found = [re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", b) for b in blocks]
    return [int(m.group(1), 16) for m in found if m]


@dataclass(frozen=True)
class Variant:
    name: str
    transfer_syntax: str
    propose: str  # storescu proposal flag
    lossless: bool


VARIANTS = [
    Variant("implicit", ImplicitVRLittleEndian, "-xi", True),
    Variant("explicit", ExplicitVRLittleEndian, "-xe", True),
    Variant("deflated", DeflatedExplicitVRLittleEndian, "-xd", True),
    Variant("jpeg-baseline", JPEGBaseline8Bit, "-xy", False),
    Variant("jpeg-extended", JPEGExtended12Bit, "-xx", False),
    Variant("jpeg-lossless-sv1", JPEGLosslessSV1, "-xs", True),
    Variant("jpeg-ls-lossless", JPEGLSLossless, "-xt", True),
    Variant("jpeg2000-lossless", JPEG2000Lossless, "-xv", True),
    Variant("rle", RLELossless, "-xr", True),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One source file per variant, encoded by dcmtk (pydicom for JPEG 2000)."""
    d = tmp_path_factory.mktemp("corpus")
    src12 = d / "src12.dcm"
    src8 = d / "src8.dcm"
    make_dx(src12, rows=ROWS, cols=COLS, bits_stored=12, seed=1)
    make_dx(src8, rows=ROWS, cols=COLS, bits_stored=8, seed=1)
    commands = {
        "implicit": ("dcmconv", "+ti", src12),
        "explicit": None,
        "deflated": ("dcmconv", "+td", src12),
        "jpeg-baseline": ("dcmcjpeg", "+eb", src8),
        "jpeg-extended": ("dcmcjpeg", "+ee", src12),
        "jpeg-lossless-sv1": ("dcmcjpeg", src12),
        "jpeg-ls-lossless": ("dcmcjpls", src12),
        "rle": ("dcmcrle", src12),
    }
    files: dict[str, Path] = {"explicit": src12}
    for name, cmd in commands.items():
        if cmd is None:
            continue
        out = d / f"{name}.dcm"
        res = dcmtk(cmd[0], *cmd[1:], out)
        assert res.returncode == 0, res.stderr
        files[name] = out
    ds = pydicom.dcmread(src12)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    files["jpeg2000-lossless"] = d / "jpeg2000-lossless.dcm"
    ds.save_as(files["jpeg2000-lossless"], enforce_file_format=True)
    return files


def _inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)


def dataset_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[dataset_offset(raw) :]


def test_echo(node: Node) -> None:
    res = dcmtk("echoscu", "-v", "-aec", node.settings.ae_title, "127.0.0.1", str(node.port))
    assert res.returncode == 0, res.stderr
    assert "Received Echo Response (Success)" in res.stdout + res.stderr


def test_wrong_called_ae_is_rejected(node: Node) -> None:
    res = dcmtk("echoscu", "-aec", "SOMEONEELSE", "127.0.0.1", str(node.port))
    assert res.returncode != 0
    assert "Association Rejected" in res.stdout + res.stderr


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_every_transfer_syntax_arrives_byte_identical(
    node: Node, corpus: dict[str, Path], variant: Variant
) -> None:
    sent = corpus[variant.name]
    sent_ds = pydicom.dcmread(sent)
    assert sent_ds.file_meta.TransferSyntaxUID == variant.transfer_syntax
    res = storescu(node, sent, flags=(variant.propose,))
    assert res.returncode == 0, res.stdout + res.stderr
    assert store_statuses(res) == [statuses.SUCCESS]

    [(record, outcome)] = node.store.instances
    assert outcome == "stored"
    assert record.sop_instance_uid == sent_ds.SOPInstanceUID
    assert record.transfer_syntax_uid == variant.transfer_syntax
    assert (record.modality, record.body_part_examined, record.view_position) == (
        "DX",
        "CHEST",
        "PA",
    )
    assert record.calling_ae_title == "STORESCU"
    assert record.received_at.tzinfo is not None
    received = Path(record.path)
    assert received.is_relative_to(node.spool.instances_dir)
    assert received.stat().st_size == record.size

    got, expected = dataset_bytes(received), dataset_bytes(sent)
    if variant.transfer_syntax == DeflatedExplicitVRLittleEndian:
        # storescu inflates the file and deflates again for the network: compare the content
        assert _inflate(got) == _inflate(expected)
    else:
        assert got == expected

    ds = pydicom.dcmread(received)
    assert ds.file_meta.TransferSyntaxUID == variant.transfer_syntax
    pixels = ds.pixel_array
    bits = 8 if variant.name == "jpeg-baseline" else 12
    source = chest_pixels(ROWS, COLS, bits_stored=bits, seed=1)
    assert pixels.shape == source.shape
    if variant.lossless:
        np.testing.assert_array_equal(pixels, source)
    else:
        diff = np.abs(pixels.astype(np.int32) - source.astype(np.int32))
        assert diff.mean() < 0.02 * (1 << bits)
        assert not np.array_equal(pixels, source)  # really lossy, really decoded


def test_real_cr_rg1(node: Node) -> None:
    src = rg1_path()
    res = storescu(node, src)
    assert res.returncode == 0, res.stdout + res.stderr
    assert store_statuses(res) == [statuses.SUCCESS]
    [(record, outcome)] = node.store.instances
    assert outcome == "stored"
    assert (record.modality, record.body_part_examined, record.view_position) == (
        "CR",
        "CHEST",
        "PA",
    )
    got, source = dataset_bytes(Path(record.path)), dataset_bytes(src)
    # storescu does not transmit the file's Data Set Trailing Padding (FFFC,FFFC):
    # everything it did send is stored unchanged
    assert source.startswith(got)
    assert source[len(got) : len(got) + 4] == b"\xfc\xff\xfc\xff"
    assert len(source) - len(got) == 12 + 126
    np.testing.assert_array_equal(
        pydicom.dcmread(record.path).pixel_array, pydicom.dcmread(src).pixel_array
    )


def test_resend_is_a_duplicate_and_changed_content_a_conflict(node: Node, tmp_path: Path) -> None:
    first = make_dx(tmp_path / "a.dcm", rows=32, cols=32, seed=3)
    assert store_statuses(storescu(node, tmp_path / "a.dcm")) == [statuses.SUCCESS]
    assert store_statuses(storescu(node, tmp_path / "a.dcm")) == [statuses.SUCCESS]
    make_dx(
        tmp_path / "b.dcm",
        rows=32,
        cols=32,
        seed=4,
        sop_uid=first.SOPInstanceUID,
        study_uid=first.StudyInstanceUID,
    )
    assert store_statuses(storescu(node, tmp_path / "b.dcm")) == [statuses.SUCCESS]
    assert node.store.outcomes(first.SOPInstanceUID) == ["stored", "duplicate", "conflict"]
    assert len(list(node.spool.instances_dir.rglob("*.dcm"))) == 1
    assert len(list(node.spool.conflicts_dir.rglob("*.dcm"))) == 1
    assert node.spool.conflicts == 1


def test_non_image_sop_class_is_stored_and_not_used(node: Node, tmp_path: Path) -> None:
    """A PACS forwarding a whole study sends SRs too: stored, recorded, never selected."""
    ds = make_dx(None, rows=16, cols=16)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.11")
    ds.Modality = "SR"
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    res = storescu(node, tmp_path / "sr.dcm", flags=("-R",))
    assert store_statuses(res) == [statuses.SUCCESS], res.stdout + res.stderr
    [(record, outcome)] = node.store.instances
    assert outcome == "stored"
    assert record.sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.11"
    selection = select_images([record])
    assert selection.images == () and selection.skip_reason


def test_missing_study_uid_cannot_be_understood(node: Node, tmp_path: Path) -> None:
    ds = make_dx(None, rows=16, cols=16)
    del ds.StudyInstanceUID
    ds.save_as(tmp_path / "nostudy.dcm", enforce_file_format=True)
    res = storescu(node, tmp_path / "nostudy.dcm")
    assert store_statuses(res) == [statuses.CANNOT_UNDERSTAND]
    assert node.store.instances == []
    [rejection] = node.store.rejections
    assert rejection["sop_instance_uid"] == ds.SOPInstanceUID
    assert "StudyInstanceUID" in rejection["reason"]
    assert list(node.spool.instances_dir.rglob("*.dcm")) == []


def test_full_spool_refuses_with_out_of_resources(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    free = shutil.disk_usage(tmp_path).free
    node = node_factory(min_free_bytes=free + (1 << 30))
    ds = make_dx(tmp_path / "a.dcm", rows=32, cols=32)
    res = storescu(node, tmp_path / "a.dcm")
    assert store_statuses(res) == [statuses.OUT_OF_RESOURCES]
    assert "Out of resources" in res.stdout + res.stderr
    assert node.store.instances == []
    assert [r["sop_instance_uid"] for r in node.store.rejections] == [ds.SOPInstanceUID]
    assert list(node.spool.instances_dir.rglob("*")) == []
    assert list(node.spool.tmp_dir.iterdir()) == []


class BrokenDatabase(Recorder):
    def record_instance(self, record: InstanceRecord, *, outcome: str) -> str:
        raise RuntimeError("database is locked")


def test_database_failure_is_never_success(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory(store=BrokenDatabase())
    ds = make_dx(tmp_path / "a.dcm", rows=16, cols=16)
    res = storescu(node, tmp_path / "a.dcm")
    assert store_statuses(res) == [statuses.PROCESSING_FAILURE]
    # the bytes are durable (the re-send is recorded then, or the spool check records them)
    assert node.spool.path_for(ds.StudyInstanceUID, ds.SOPInstanceUID).exists()


class DatabaseDownOnce:
    """A real study database that is unreachable for the first instance recorded."""

    def __init__(self, store: StudyStore) -> None:
        self.store = store
        self.refused = 0

    def record_instance(self, record: InstanceRecord, *, outcome: str) -> str:
        if not self.refused:
            self.refused += 1
            raise DatabaseUnavailable("the study database did not answer within 0 s")
        return self.store.record_instance(record, outcome=outcome)

    def record_rejection(self, **kwargs: Any) -> None:
        self.store.record_rejection(**kwargs)


def test_resend_after_a_database_outage_is_recorded_not_answered_as_a_duplicate(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """Refused while the database was down, the spooled copy is not enough: the sender's retry
    finds no row behind it, so the instance is recorded then, as stored, and only then is the
    answer Success."""
    store = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    try:
        node = node_factory(store=DatabaseDownOnce(store))
        ds = make_dx(tmp_path / "a.dcm", rows=16, cols=16)
        assert store_statuses(storescu(node, tmp_path / "a.dcm")) == [statuses.PROCESSING_FAILURE]
        assert store.get(ds.StudyInstanceUID) is None
        assert store_statuses(storescu(node, tmp_path / "a.dcm")) == [statuses.SUCCESS]
        view = store.get(ds.StudyInstanceUID)
        assert view is not None and view.state == "receiving" and view.instance_count == 1
        (row,) = store.instances(ds.StudyInstanceUID)
        assert row.path == str(node.spool.path_for(ds.StudyInstanceUID, ds.SOPInstanceUID))
        assert "recorded-late" in [e.kind for e in store.events(ds.StudyInstanceUID)]
        # a third copy is now a true duplicate of a recorded instance
        assert store_statuses(storescu(node, tmp_path / "a.dcm")) == [statuses.SUCCESS]
        assert store.instances(ds.StudyInstanceUID)[0].sop_instance_uid == ds.SOPInstanceUID
        assert "duplicate" in [e.kind for e in store.events(ds.StudyInstanceUID)]
    finally:
        store.close()


def test_unwritable_spool_is_processing_failure(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory()
    node.spool.tmp_dir.rmdir()  # the temp directory vanished: an I/O error, not a full disk
    make_dx(tmp_path / "a.dcm", rows=16, cols=16)
    res = storescu(node, tmp_path / "a.dcm")
    assert store_statuses(res) == [statuses.PROCESSING_FAILURE]
    assert node.store.instances == []


def test_association_aborted_mid_data_set_leaves_nothing(node: Node, tmp_path: Path) -> None:
    """The streamed data set of a C-STORE cut off by an A-ABORT is removed, never recorded."""
    import time
    from io import BytesIO

    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    ds = make_dx(tmp_path / "a.dcm", rows=ROWS, cols=COLS)
    encoded = BytesIO()
    pydicom.dcmwrite(encoded, ds, enforce_file_format=True)
    data = encoded.getvalue()
    ae = AE(ae_title="CUTTER")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(data[dataset_offset(data) :])
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id
    assert context_id is not None
    pdus = list(message.encode_msg(context_id, 8192))
    assert len(pdus) > 4
    for pdu in pdus[: len(pdus) // 2]:  # the command and half of the data set
        assoc.dul.send_pdu(pdu)
    deadline = time.monotonic() + 10
    while not list(node.spool.tmp_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(node.spool.tmp_dir.iterdir()), "the data set streams into tmp/ as it arrives"
    assoc.abort()
    deadline = time.monotonic() + 10
    while list(node.spool.tmp_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(node.spool.tmp_dir.iterdir()) == []
    assert list(node.spool.instances_dir.rglob("*.dcm")) == []
    assert node.store.instances == [] and node.store.rejections == []


def test_each_association_gets_its_own_copy_of_the_supported_contexts(node: Node) -> None:
    """The listener hands pynetdicom contexts whose per-association copy is cheap (shared UIDs)
    but still a copy: what one association changes is not seen by the listener or the next."""

    listener = node.server.contexts
    assert listener and all(isinstance(cx, SharedSyntaxContext) for cx in listener)
    expected = build_ae(node.settings).supported_contexts
    assert [(str(cx.abstract_syntax), list(cx.transfer_syntax)) for cx in listener] == [
        (str(cx.abstract_syntax), list(cx.transfer_syntax)) for cx in expected
    ]
    copied = copy.deepcopy(listener)
    assert all(type(cx) is PresentationContext for cx in copied)
    copied[0].context_id = 1
    copied[0].transfer_syntax = [ExplicitVRLittleEndian]
    assert listener[0].context_id is None
    assert list(listener[0].transfer_syntax) == list(expected[0].transfer_syntax)
    for _ in range(2):  # associations still negotiate from the listener's contexts
        res = dcmtk("echoscu", "-aec", node.settings.ae_title, "127.0.0.1", str(node.port))
        assert res.returncode == 0, res.stderr
