"""Test-only fault injection for a real ``d2r worker`` process (never installed with d2r).

A test puts this folder first on the worker's ``PYTHONPATH`` and names a JSON file in
``TEST_FAULTS_FILE`` mapping StudyInstanceUID -> stage (``spool-read`` ... ``send``). Python
imports ``sitecustomize`` at start-up; this one wraps :meth:`worker.stages.StageTracker.enter`
so that, while the worker works on a listed study, entering its stage raises
``RuntimeError("injected fault at <stage>")``. Everything else is the product's own path.
"""

from __future__ import annotations

import json
import os

_FAULTS = os.environ.get("TEST_FAULTS_FILE")

if _FAULTS:
    from observability import logs
    from worker import stages

    _enter = stages.StageTracker.enter

    def _faulty_enter(self: stages.StageTracker, stage: str) -> None:
        _enter(self, stage)
        uid = logs.study_instance_uid_var.get()
        with open(str(_FAULTS), encoding="utf-8") as f:
            faults = json.load(f)
        if uid is not None and faults.get(uid) == str(self.current):
            raise RuntimeError(f"injected fault at {self.current}")

    stages.StageTracker.enter = _faulty_enter  # type: ignore[method-assign]
