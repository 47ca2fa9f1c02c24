"""The study database on SQLite and PostgreSQL, as the DICOM node tests have it."""

from tests.dicom_node.conftest import postgres_admin_url, store

__all__ = ["postgres_admin_url", "store"]
