"""A Redis Sentinel failover under load loses no study.

Topology: ``d2r node`` + one ``d2r worker`` with ``D2R_BROKER_URL=sentinel://...`` on a real
Sentinel cluster (master, replica, three sentinels: :mod:`tests.support.redis_sentinel`), Orthanc
as the PACS. Studies arrive one at a time while the master is killed (SIGKILL) and the sentinels
promote the replica. Every study must end ``done`` with one SR pair in the PACS, and the node's
readiness (its ``broker`` check) must see the new master.

The visibility timeout, reconciler period and claim lease keep their production defaults: a job
lost with the old master must come back through the node, not through a shortened timeout.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from observability.metrics import QueueDepthCollector
from tests.reliability.stack import Stack, make_stack, send_datasets
from tests.support.dicom_files import make_dx
from tests.support.processes import free_port, wait_for
from tests.support.redis_sentinel import redis_sentinel_cluster
from worker.messages import REPORT_QUEUE, SEND_QUEUE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDIES = 20
#: seconds between two studies: the failover happens while they keep arriving
PACE = 0.5


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=15) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return 0, {}


def _ready(port: int) -> bool:
    return _readyz(port)[0] == 200


def test_a_sentinel_failover_during_ingest_reports_every_study_exactly_once(
    orthanc_factory: Any, model_dir: Path, tmp_path: Path
) -> None:
    node_http, worker_http = free_port(), free_port()
    with redis_sentinel_cluster(tmp_path) as cluster:
        s: Stack = make_stack(
            orthanc_factory, model_dir, tmp_path, D2R_HTTP_PORT=str(node_http), **cluster.env()
        )
        try:
            s.start_node()
            worker = s.start_worker(D2R_HTTP_PORT=str(worker_http))
            for port in (node_http, worker_http):  # the worker: model loaded, broker reachable
                wait_for(partial(_ready, port), 90, f"/readyz on {port}")

            datasets = [make_dx(None, rows=96, cols=80, seed=4000 + n) for n in range(STUDIES)]
            acknowledged: list[str] = []

            def send() -> None:
                for ds in datasets:
                    acknowledged.extend(send_datasets(s.node_port, [ds]))
                    time.sleep(PACE)

            sender = threading.Thread(target=send, name="modality", daemon=True)
            sender.start()
            uids = [str(ds.StudyInstanceUID) for ds in datasets]
            # fail over while the worker is busy, studies wait in the queue and more arrive
            wait_for(lambda: sum(s.state(u) == "done" for u in uids) >= 3, 90, "the first reports")
            old = cluster.master_address()
            killed = time.time()
            promoted = cluster.failover()
            print(f"failover: the new master answered {promoted:.2f} s after the kill")
            assert cluster.master_address() != old
            sender.join(timeout=120)
            assert not sender.is_alive()
            # the node keeps receiving through the failover: the broker is not on that path
            assert acknowledged == [str(ds.SOPInstanceUID) for ds in datasets]

            s.wait_states(uids, {"done"}, timeout=150)
            finished = [v.finished_at for u in uids if (v := s.view(u)) and v.finished_at]
            print(f"the last study was done {max(finished) - killed:.1f} s after the kill")
            for uid in uids:
                s.assert_reported_exactly_once(uid)
            assert worker.alive(), s.logs()

            # readiness follows the new master: the broker check of node and worker, and a
            # fresh collector
            for port in (node_http, worker_http):
                status, body = _readyz(port)
                assert status == 200, body
                assert body["checks"]["broker"] == "ok", body
            collector = QueueDepthCollector(
                cluster.broker_url,
                tmp_path / "queue",
                (REPORT_QUEUE, SEND_QUEUE),
                sentinel_master=cluster.master_name,
            )
            collector.ping()
            assert collector.depths() == {REPORT_QUEUE: 0, SEND_QUEUE: 0}
        finally:
            s.stop()
