"""Fixtures for the DICOM node tests: a loopback SCP with a real spool and a recording store,
and the study database on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dicom_node.scp import start_server
from dicom_node.settings import NodeSettings
from dicom_node.spool import Spool
from studydb.records import InstanceRecord
from studydb.store import StudyStore
from tests.dicom_node.node_harness import Node, NodeFactory, Recorder, free_port
from tests.support.postgres import postgres_server, scratch_database


@pytest.fixture
def node_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeFactory]:
    """Start real listeners (our SCP) on free loopback ports; all are stopped at teardown."""
    nodes: list[Node] = []

    def start(
        *, min_free_bytes: int = 0, spool_dir: Path | None = None, store: Recorder | None = None
    ) -> Node:
        root = spool_dir or tmp_path_factory.mktemp("spool")
        settings = NodeSettings.from_env(
            {
                "D2R_AE_TITLE": "D2RTEST",
                "D2R_HOST": "127.0.0.1",
                "D2R_PORT": str(free_port()),
                "D2R_SPOOL_DIR": str(root),
                "D2R_MIN_FREE_BYTES": str(min_free_bytes),
            }
        )
        spool = Spool(settings.spool_dir, min_free_bytes=settings.min_free_bytes)
        store = store or Recorder()
        server = start_server(settings, spool, store, block=False)
        node = Node(settings, spool, store, server)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.server.shutdown()


@pytest.fixture
def node(node_factory: NodeFactory) -> Node:
    return node_factory()


def instance_row(
    study: str, sop: str, *, view: str = "PA", modality: str = "CR", t: float = 1000.0
) -> InstanceRecord:
    """A study-database row of one chest radiograph (header values only)."""
    return InstanceRecord(
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality=modality,
        body_part_examined="CHEST",
        view_position=view,
        series_description="",
        path=f"/spool/{sop}.dcm",
        size=10,
        sha256="0" * 64,
        calling_ae_title="PACS",
        received_at=datetime.fromtimestamp(t, UTC),
    )


@pytest.fixture(scope="module")
def postgres_admin_url() -> Iterator[str]:
    """A private PostgreSQL cluster, or the one named by D2R_TEST_POSTGRES_URL."""
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StudyStore]:
    if request.param == "sqlite":
        s = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
        yield s
        s.close()
        return
    with scratch_database(request.getfixturevalue("postgres_admin_url"), "d2r_test") as url:
        s = StudyStore(url)
        try:
            yield s
        finally:
            s.close()
