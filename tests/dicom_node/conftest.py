"""Fixtures for the DICOM node tests: a loopback SCP with a real spool and a recording store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.scp import start_server
from dicom_node.settings import NodeSettings
from dicom_node.spool import Spool
from tests.dicom_node.node_harness import Node, NodeFactory, Recorder, free_port


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
