"""The senders are tested against the node's own listener too: reuse its fixtures."""

from tests.dicom_node.conftest import node, node_factory

__all__ = ["node", "node_factory"]
