"""Alembic migrations of the study database (see README.md in this folder)."""
