"""Results latency: last instance acknowledged -> SRs acknowledged by the PACS, through Orthanc.

Orthanc (the PACS) sends one-image studies to ``d2r node`` with a synchronous C-STORE job
(``POST /modalities/d2r/store``), one at a time; a ``d2r worker`` on Redis reports them and sends
the SRs back to Orthanc. The latency of a study is the study database's ``finished_at`` (every
destination acknowledged) minus the moment Orthanc's store job returned (its last instance
acknowledged by the node). Default study timers (10 s quiet period, 2 s release grace period)
unless ``--env NAME=VALUE`` overrides them.

Usage::

    python bench/load/roundtrip.py [--studies 5] [--model DIR] [--env D2R_...=...]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.reliability.stack import make_stack  # noqa: E402
from tests.support.dicom_files import make_dx  # noqa: E402
from tests.support.orthanc import OrthancServers  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "d2r-demo-phantom")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the node")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="d2r-roundtrip-"))
    orthanc_factory = OrthancServers(work)

    env = {
        "D2R_STUDY_QUIET_SECONDS": "10",
        "D2R_STUDY_FORCE_SECONDS": "600",
        **dict(e.split("=", 1) for e in args.env),
    }
    stack = make_stack(orthanc_factory, args.model, work, **env)
    latencies: list[float] = []
    try:
        stack.start_node()
        stack.start_worker()
        orthanc = orthanc_factory.servers[0]
        for n in range(args.studies + 1):  # the first one warms the worker up, not counted
            path = work / f"study{n}.dcm"
            ds = make_dx(path, rows=512, cols=416, seed=100 + n)
            uid = str(ds.StudyInstanceUID)
            answer = orthanc.upload(path)
            orthanc.store_to_modality("d2r", [answer["ID"]])
            acknowledged = time.time()
            stack.wait_states([uid], {"done", "failed", "skipped"}, timeout=300)
            view = stack.view(uid)
            assert view is not None and view.state == "done", view
            assert view.finished_at is not None
            if n:
                latencies.append(view.finished_at - acknowledged)
                print(f"study {n}: {latencies[-1]:.2f} s", flush=True)
    finally:
        stack.stop()
        orthanc_factory.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"last instance acknowledged -> SRs acknowledged: p50 {statistics.median(latencies):.2f} s,"
        f" min {min(latencies):.2f} s, max {max(latencies):.2f} s ({len(latencies)} studies)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
