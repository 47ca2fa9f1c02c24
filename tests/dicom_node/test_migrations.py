"""Study-database migrations (Alembic) on SQLite and PostgreSQL.

A "previous release" database (the tables of ``legacy_schema``, no revision table, studies in every
state with instances, deliveries, events and rejections) is upgraded with ``d2r db upgrade`` and
must keep every row; a study then runs through on it. A later migration (a test revision added
to a copy of the shipped scripts, run in batch mode on SQLite) stops a start as "behind" until
upgraded; a database written by it stops the start of this release as "ahead".
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from studydb import schema
from studydb.engine import make_engine
from studydb.errors import SchemaAheadError, SchemaBehindError, UnknownSchemaError
from studydb.records import STUDY_STATES, InstanceRecord
from studydb.store import StudyStore
from studydb.tables import metadata
from tests.dicom_node import legacy_schema
from tests.support.dicom_files import rg1_path
from tests.support.postgres import postgres_server, scratch_database
from tests.support.processes import Process, base_env, d2r_cmd, free_port, wait_for, wait_port
from tests.support.prometheus import sample_value

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def postgres_admin_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'd2r.db'}"
        return
    with scratch_database(request.getfixturevalue("postgres_admin_url"), "d2r_mig") as url:
        yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    e = make_engine(db_url)
    yield e
    e.dispose()


LATER_MIGRATION = '''
"""Test-only later revision: a counter on studies, the table rebuilt (batch mode on SQLite)."""

import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", recreate="always") as batch:
        batch.add_column(
            sa.Column("test_attempts", sa.Integer, nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("test_attempts")
'''


@pytest.fixture
def later_scripts(tmp_path: Path) -> Path:
    """A copy of the shipped migrations with one more revision (9999) on their head: a later
    release."""
    location = tmp_path / "migrations"
    shutil.copytree(schema.SCRIPT_LOCATION, location, ignore=shutil.ignore_patterns("__pycache__"))
    head = ScriptDirectory(str(location)).get_current_head()
    (location / "versions" / "r9999_test_attempts.py").write_text(
        LATER_MIGRATION.replace("{head}", str(head))
    )
    return location


# ------------------------------------------------------------------ a previous release's database
def _instance(study: str, sop: str, t: float) -> dict[str, Any]:
    return {
        "sop_instance_uid": sop,
        "study_instance_uid": study,
        "series_instance_uid": study + ".1",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "modality": "CR",
        "body_part_examined": "CHEST",
        "view_position": "PA",
        "series_description": "",
        "path": f"/spool/{sop}.dcm",
        "size": 1234,
        "sha256": "a" * 64,
        "calling_ae_title": "PACS",
        "received_at": t,
        "duplicates": 0,
        "conflicts": 0,
    }


def build_previous_release(engine: sa.Engine) -> None:
    """The tables as a release before migrations created them, with a study in every state."""
    legacy_schema.metadata.create_all(engine)
    t = 1_700_000_000.0
    with engine.begin() as conn:
        for n, state in enumerate(STUDY_STATES):
            uid = f"1.2.826.0.1.{n}"
            finished = state in ("done", "failed", "skipped")
            conn.execute(
                legacy_schema.studies_table.insert().values(
                    study_instance_uid=uid,
                    state=state,
                    reason={"failed": "model error", "skipped": "no frontal CR/DX"}.get(state),
                    generation=0 if state == "receiving" else 1,
                    first_received_at=t,
                    last_received_at=t + 1,
                    queued_at=None if state == "receiving" else t + 11,
                    owner="task-1" if state == "processing" else None,
                    lease_expires_at=t + 600 if state == "processing" else None,
                    processed_at=t + 20 if state in ("sending", "done") else None,
                    finished_at=t + 30 if finished else None,
                    updated_at=t + 30,
                    model_name="d2r-net" if state in ("sending", "done") else None,
                    model_version="1.0" if state in ("sending", "done") else None,
                    findings="Heart size normal." if state in ("sending", "done") else None,
                    impression="No acute finding." if state in ("sending", "done") else None,
                    lesion_count=0 if state in ("sending", "done") else None,
                    result_paths=json.dumps([f"/spool/sr/{uid}.dcm"])
                    if state in ("sending", "done")
                    else None,
                )
            )
            conn.execute(
                legacy_schema.instances_table.insert().values(_instance(uid, uid + ".1", t))
            )
            conn.execute(
                legacy_schema.events_table.insert().values(
                    study_instance_uid=uid, at=t, kind="received", detail="first instance received"
                )
            )
        for dest, state in (("PACS@10.0.0.5:104", "pending"), ("ARCHIVE@10.0.0.6:104", "sent")):
            conn.execute(
                legacy_schema.deliveries_table.insert().values(
                    study_instance_uid="1.2.826.0.1.3",  # sending
                    destination=dest,
                    state=state,
                    attempts=1,
                    next_attempt_at=t + 60,
                    enqueued_at=None,
                    last_error="association rejected" if state == "pending" else None,
                    sent_at=t + 25 if state == "sent" else None,
                    updated_at=t + 25,
                )
            )
        conn.execute(
            legacy_schema.rejections_table.insert().values(
                sop_instance_uid="1.2.3.9",
                study_instance_uid=None,
                calling_ae_title="MODALITY",
                reason="missing Study Instance UID",
                at=t,
            )
        )


def snapshot(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every previous-release table, in the previous release's columns."""
    out = {}
    with engine.connect() as conn:
        for table in legacy_schema.metadata.sorted_tables:
            cols: list[sa.ColumnClause[Any]] = [sa.column(c.name) for c in table.columns]
            rows = conn.execute(sa.select(*cols).select_from(sa.table(table.name))).all()
            out[table.name] = sorted(tuple(r) for r in rows)
    return out


def d2r(
    *argv: str, url: str, tmp_path: Path, prelude: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run ``d2r ARGV`` in a child process (``prelude``: Python run before ``main``)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "D2R_DATABASE_URL": url,
        "D2R_SPOOL_DIR": str(tmp_path / "spool"),
        "D2R_HTTP_PORT": "0",
        "D2R_PORT": str(free_port()),
    }
    code = f"{prelude}\nimport sys\nfrom cli.main import main\nsys.exit(main({list(argv)!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


# -------------------------------------------------------------------------------------- tests
def test_models_match_the_migrated_head_schema(engine: sa.Engine) -> None:
    """A model change without a migration fails here: metadata and migrated schema must agree."""
    schema.upgrade(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, metadata) == []
        # The comparison does see a column the migrations lack.
        changed = sa.MetaData()
        for table in metadata.sorted_tables:
            table.to_metadata(changed)
        changed.tables["studies"].append_column(sa.Column("not_migrated", sa.Integer))
        diff = compare_metadata(ctx, changed)
    assert [(d[0], d[2], d[3].name) for d in diff] == [("add_column", "studies", "not_migrated")]


def test_a_fresh_database_is_created_by_the_migrations(engine: sa.Engine, db_url: str) -> None:
    assert schema.current_state(engine).state == "empty"
    store = StudyStore(db_url)
    store.close()
    found = schema.current_state(engine)
    assert (found.state, found.current) == ("current", found.head)


def test_previous_release_database_upgrades_without_loss_and_works(
    engine: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    build_previous_release(engine)
    before = snapshot(engine)
    assert schema.current_state(engine).state == "legacy"
    assert len(before["studies"]) == len(STUDY_STATES)

    done = d2r("db", "upgrade", url=db_url, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "upgraded from legacy to" in done.stdout
    current = d2r("db", "current", url=db_url, tmp_path=tmp_path)
    assert current.returncode == 0 and "state: current" in current.stdout
    assert snapshot(engine) == before  # nothing lost, nothing changed

    store = StudyStore(db_url)
    try:
        # The study left queued by the previous release is claimed, reported and delivered.
        queued = "1.2.826.0.1.1"
        assert store.claim(queued, generation=1, owner="w", lease_seconds=60)
        reported = store.mark_reported(
            queued,
            owner="w",
            result_paths=["/spool/sr/x.dcm"],
            model_name="d2r-net",
            model_version="1.1",
            findings="Clear lungs.",
            impression="Normal.",
            lesion_count=0,
            destinations=["PACS@10.0.0.5:104"],
        )
        assert reported
        state = store.record_delivery_attempt(
            queued, "PACS@10.0.0.5:104", ok=True, error=None, max_attempts=3, retry_delay=1
        )
        assert state == "sent"
        view = store.get(queued)
        assert view is not None and view.state == "done"
        # The sending study's pending delivery completes it.
        store.record_delivery_attempt(
            "1.2.826.0.1.3", "PACS@10.0.0.5:104", ok=True, error=None, max_attempts=3, retry_delay=1
        )
        view = store.get("1.2.826.0.1.3")
        assert view is not None and view.state == "done"
        # A new study goes from its first instance to queued.
        store.record_instance(_record("1.2.826.0.9", "1.2.826.0.9.1"), outcome="stored")
        assert store.force_complete("1.2.826.0.9")
        due = store.due_for_completion(quiet_seconds=10, force_seconds=60)
        assert sorted(due) == ["1.2.826.0.1.0", "1.2.826.0.9"]  # the old receiving one too
        assert store.mark_queued("1.2.826.0.9") == 1
        assert store.count_by_state()["queued"] == 1
        assert store.reset_for_retry("1.2.826.0.1.5") == "receiving"  # the failed one
    finally:
        store.close()


def _record(study: str, sop: str) -> InstanceRecord:
    row = _instance(study, sop, 1_800_000_000.0)
    del row["duplicates"], row["conflicts"]
    row["received_at"] = datetime.fromtimestamp(row["received_at"], UTC)
    return InstanceRecord(**row)


def test_a_start_behind_stops_until_upgraded(
    engine: sa.Engine, db_url: str, later_scripts: Path, tmp_path: Path
) -> None:
    build_previous_release(engine)
    before = snapshot(engine)

    with pytest.raises(SchemaBehindError, match=r"d2r db upgrade"):
        schema.prepare(engine, script_location=later_scripts)
    found = schema.current_state(engine, script_location=later_scripts)
    assert (found.state, found.current, found.head) == ("behind", schema.BASELINE, "9999")

    # d2r node of the later release refuses with one line naming the command, before it binds.
    prelude = (
        "import pathlib, studydb.schema as s\n"
        f"s.SCRIPT_LOCATION = pathlib.Path({str(later_scripts)!r})"
    )
    refused = d2r("node", url=db_url, tmp_path=tmp_path, prelude=prelude)
    assert refused.returncode == 3
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "d2r db upgrade" in lines[0] and "9999" in lines[0], refused.stderr

    # D2R_DB_AUTO_UPGRADE: several processes starting at once upgrade once, under the lock.
    errors: list[BaseException] = []

    def start() -> None:
        e = make_engine(db_url)
        try:
            schema.prepare(e, auto_upgrade=True, script_location=later_scripts)
        except BaseException as exc:
            errors.append(exc)
        finally:
            e.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    found = schema.current_state(engine, script_location=later_scripts)
    assert (found.state, found.current) == ("current", "9999")
    assert snapshot(engine) == before
    with engine.connect() as conn:
        counts = conn.execute(sa.text("SELECT test_attempts FROM studies")).scalars().all()
    assert counts == [0] * len(STUDY_STATES)

    # This release (which does not know 9999) now refuses the database: the rollback case.
    with pytest.raises(SchemaAheadError, match=r"revision 9999.*does not know"):
        StudyStore(db_url)
    refused = d2r("node", url=db_url, tmp_path=tmp_path)
    assert refused.returncode == 3
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "9999" in lines[0] and "newer d2r" in lines[0], refused.stderr
    upgrade = d2r("db", "upgrade", url=db_url, tmp_path=tmp_path)
    assert upgrade.returncode == 3 and "does not know" in upgrade.stderr


def test_tables_that_are_not_the_baseline_are_refused(engine: sa.Engine, db_url: str) -> None:
    legacy_schema.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE deliveries DROP COLUMN sent_at"))
    with pytest.raises(UnknownSchemaError, match=r"deliveries lacks sent_at"):
        StudyStore(db_url)
    assert schema.current_state(engine).current is None  # not stamped


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(360)
def test_serve_runs_a_study_on_an_upgraded_previous_release_database(
    engine: sa.Engine, db_url: str, model_dir: Path, tmp_path: Path
) -> None:
    """The upgraded database under ``d2r serve``: a new study is reported and delivered while the
    previous release's studies in flight are picked up; the endpoint wants its token."""
    build_previous_release(engine)
    before = snapshot(engine)
    done = d2r("db", "upgrade", url=db_url, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr

    node_port, http_port, pacs_port = free_port(), free_port(), free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    token = secrets.token_hex(16)
    (tmp_path / "tokens").write_text(f"prometheus metrics {token}\n")
    env = base_env(
        D2R_DATABASE_URL=db_url,
        D2R_MODEL=str(model_dir),
        D2R_SPOOL_DIR=str(tmp_path / "data" / "spool"),
        D2R_PORT=str(node_port),
        D2R_HTTP_PORT=str(http_port),
        D2R_HTTP_AUTH="required",
        D2R_HTTP_TOKENS_FILE=str(tmp_path / "tokens"),
        D2R_DESTINATIONS=f"PACS@127.0.0.1:{pacs_port}",
        D2R_STUDY_QUIET_SECONDS="1",
        D2R_RECONCILE_SECONDS="2",
        D2R_MIN_FREE_BYTES="0",
        D2R_ACSE_TIMEOUT="5",
        D2R_NETWORK_TIMEOUT="5",
    )
    base = f"http://127.0.0.1:{http_port}"
    study_uid = str(pydicom.dcmread(rg1_path(), stop_before_pixels=True).StudyInstanceUID)
    pacs = serve = None
    store = None
    try:
        pacs = Process(
            ["/usr/bin/storescp", "-aet", "PACS", "-od", str(received), str(pacs_port)],
            env=env,
            log=tmp_path / "storescp.log",
        )
        serve = Process(d2r_cmd("serve"), env=env, log=tmp_path / "serve.log")
        wait_port(pacs_port)
        wait_port(node_port, timeout=90)
        wait_port(http_port, timeout=30)
        sent = subprocess.run(
            ["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "D2R", "127.0.0.1", str(node_port),
             str(rg1_path())],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        store = StudyStore(db_url)

        def state() -> str | None:
            view = store.get(study_uid) if store else None
            return None if view is None else view.state

        try:
            wait_for(lambda: state() == "done", 240, "the new study to be done", interval=0.5)
        except TimeoutError:
            pytest.fail(f"state {state()}; serve log:\n{serve.log_tail()}")
        assert list(received.iterdir()), "the PACS received no SR"
        # Every study of the previous release is still there, with its history.
        for uid, *_ in before["studies"]:
            assert store.get(uid) is not None, uid
            assert store.events(uid)[0].kind == "received", uid
        # The runtime endpoint: probes open, /metrics only with the token.
        assert urllib.request.urlopen(base + "/healthz", timeout=10).status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/metrics", timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(
            base + "/metrics", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as rsp:
            assert sample_value(rsp.read().decode(), "d2r_studies", state="done") is not None
    finally:
        if store is not None:
            store.close()
        for proc in (serve, pacs):
            if proc is not None:
                proc.stop()


def test_a_start_on_a_previous_release_database_stamps_it_as_the_baseline(
    engine: sa.Engine, db_url: str
) -> None:
    build_previous_release(engine)
    before = snapshot(engine)
    # Stamped as the baseline, then upgraded to this release's newest revision (at most a
    # no-op while the baseline is the newest).
    store = StudyStore(db_url, auto_upgrade=True)
    try:
        assert store.count_by_state() == dict.fromkeys(STUDY_STATES, 1)
    finally:
        store.close()
    found = schema.current_state(engine)
    assert (found.state, found.current) == ("current", found.head)
    with engine.connect() as conn:
        history = MigrationContext.configure(conn).get_current_heads()
    assert history == (found.head,)
    assert snapshot(engine) == before


def test_revision_0005_gives_every_study_a_priority_and_its_queued_job_routine(
    engine: sa.Engine, db_url: str
) -> None:
    """Studies written at revision 0004 are routine after the upgrade; the jobs of those queued
    or processing count as sent routine, so only a higher priority sends them again."""
    schema.upgrade(engine, target="0004")
    with engine.begin() as conn:
        for n, state in enumerate(["receiving", "queued", "processing", "done"]):
            uid = f"1.5.{n}"
            conn.execute(
                sa.text(
                    "INSERT INTO studies (study_instance_uid, state, generation, "
                    "first_received_at, last_received_at, queued_at, updated_at, attempts, "
                    "state_changed_at, open_associations) VALUES "
                    "(:uid, :state, 1, 1000, 1000, 1001, 1001, 0, 1001, 0)"
                ),
                {"uid": uid, "state": state},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO instances (sop_instance_uid, study_instance_uid, "
                    "series_instance_uid, sop_class_uid, transfer_syntax_uid, modality, "
                    "body_part_examined, view_position, series_description, path, size, sha256, "
                    "calling_ae_title, received_at, duplicates, conflicts) VALUES "
                    "(:sop, :uid, :uid, '1.2.840.10008.5.1.4.1.1.1', '1.2.840.10008.1.2.1', "
                    "'CR', 'CHEST', 'PA', '', '/spool/x.dcm', 1, '', 'PACS', 1000, 0, 0)"
                ),
                {"sop": uid + ".1", "uid": uid},
            )
    _, after = schema.upgrade(engine)
    assert after.current == after.head
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT study_instance_uid, priority, queued_priority FROM studies "
                "ORDER BY study_instance_uid"
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("1.5.0", "routine", None),
        ("1.5.1", "routine", "routine"),
        ("1.5.2", "routine", "routine"),
        ("1.5.3", "routine", None),
    ]
    store = StudyStore(db_url)
    try:
        assert store.get("1.5.1").priority == "routine"  # type: ignore[union-attr]
        assert [i.priority for i in store.instances("1.5.1")] == [None]
        assert store.queued_studies(limit=5) == [("1.5.1", 1)]
        assert store.count_by_priority() == {"stat": 0, "urgent": 0, "routine": 1, "low": 0}
        assert store.promotion_candidates() == []
    finally:
        store.close()
    from alembic import command
    from alembic.config import Config

    with engine.begin() as conn:  # and back: the downgrade drops the columns
        cfg = Config()
        cfg.set_main_option("script_location", str(schema.SCRIPT_LOCATION))
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
    with engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("studies")}
    assert "priority" not in columns and "queued_priority" not in columns


def test_revision_0006_adds_accession_numbers_and_the_signed_report_tables(
    engine: sa.Engine, db_url: str
) -> None:
    """Instances of revision 0005 keep their rows with no accession number; the signed reports
    of a study are stored, superseded and read back; the downgrade drops it all again."""
    from studydb.feedback import ReportMessage, SignedReport

    schema.upgrade(engine, target="0005")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO studies (study_instance_uid, state, generation, first_received_at, "
                "last_received_at, updated_at, attempts, open_associations, priority) VALUES "
                "('1.6.1', 'done', 1, 1000, 1000, 1001, 1, 0, 'routine')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO instances (sop_instance_uid, study_instance_uid, "
                "series_instance_uid, sop_class_uid, transfer_syntax_uid, modality, "
                "body_part_examined, view_position, series_description, path, size, sha256, "
                "calling_ae_title, received_at, duplicates, conflicts) VALUES "
                "('1.6.1.1', '1.6.1', '1.6.1.2', '1.2.840.10008.5.1.4.1.1.1', "
                "'1.2.840.10008.1.2.1', 'CR', 'CHEST', 'PA', '', '/spool/x.dcm', 1, '', 'PACS', "
                "1000, 0, 0)"
            )
        )
    _, after = schema.upgrade(engine)
    assert after.current == after.head
    store = StudyStore(db_url)
    try:
        assert [i.accession_number for i in store.instances("1.6.1")] == [""]
        assert store.studies_with_accession("A1") == []
        assert store.known_studies(["1.6.9", "1.6.1"]) == ["1.6.1"]
        for status, text, control in (("F", "Clear lungs.", "M1"), ("C", "Small effusion.", "M2")):
            store.store_signed_report(
                SignedReport("1.6.1", 0, status, text, "hl7:RIS^H", 2000.0, control)
            )
        reports = store.signed_reports("1.6.1")
        assert [(r.version, r.result_status, r.superseded_at is None) for r in reports] == [
            (1, "F", False),
            (2, "C", True),
        ]
        store.record_report_message(
            ReportMessage(2000.0, "M3", "hl7:RIS^H", "P", "A1", None, "not-final", "AA", "n")
        )
        assert [m.outcome for m in store.report_messages()] == ["not-final"]
    finally:
        store.close()
    from alembic import command
    from alembic.config import Config

    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(schema.SCRIPT_LOCATION))
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        columns = {c["name"] for c in inspector.get_columns("instances")}
        tables = set(inspector.get_table_names())
    assert "accession_number" not in columns
    assert not tables & {"signed_reports", "report_messages", "report_scores"}


def test_revision_0007_records_what_the_gate_and_the_model_made_of_each_study(
    engine: sa.Engine, db_url: str
) -> None:
    """A study in processing at revision 0006 is reported after the upgrade with its
    observation (gate score, calibration, findings), which the drift window reads back; the
    downgrade drops the drift tables and keeps the study."""
    from studydb.drift import GateReference, Observation, drift_window

    schema.upgrade(engine, target="0006")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO studies (study_instance_uid, state, generation, first_received_at, "
                "last_received_at, updated_at, attempts, open_associations, priority, owner) "
                "VALUES ('1.7.1', 'processing', 1, 1000, 1000, 1001, 1, 0, 'routine', 'w1')"
            )
        )
    _, after = schema.upgrade(engine)
    assert after.current == after.head
    gate = GateReference(20.0, 99.5, 24, (1.0, 5.0, 9.0))
    store = StudyStore(db_url)
    try:
        assert drift_window(store, window_studies=10, baseline_studies=10) is None
        assert store.mark_reported(
            "1.7.1",
            owner="w1",
            result_paths=[],
            model_name="m",
            model_version="1",
            findings="Cardiomegaly.",
            impression="",
            lesion_count=1,
            destinations=[],
            observation=Observation("m", "1", False, 4.0, gate, ("Cardiomegaly",)),
        )
        window = drift_window(store, window_studies=10, baseline_studies=10)
    finally:
        store.close()
    assert window is not None
    assert (window.window.studies, window.window.positives) == (1, {"Cardiomegaly": 1})
    assert (window.gate_scores, window.gate) == ((4.0,), gate)
    from alembic import command
    from alembic.config import Config

    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(schema.SCRIPT_LOCATION))
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0006")
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        state = conn.execute(sa.text("SELECT state FROM studies")).scalar()
    assert not tables & {"study_observations", "observed_findings", "gate_references"}
    assert state == "done"
