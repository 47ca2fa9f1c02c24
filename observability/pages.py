"""The status page's I/O: studies from the study database, headers and previews from the spool.

Rendering is pure (:mod:`observability.status_page`); this module reads what it renders.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

__all__ = ["StatusPages"]


class StatusPages:
    """The status page's view of a study store (I/O around :mod:`observability.status_page`).

    Parameters
    ----------
    store : StudyStore
        The study database.
    show_phi : bool
        Show patient name and ID, read from the first instance's header.
    """

    def __init__(self, store: Any, *, show_phi: bool = False, limit: int = 50) -> None:
        self.store = store
        self.show_phi = show_phi
        self.limit = limit
        self._previews: OrderedDict[tuple[str, tuple[str, ...]], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _patient(self, study_uid: str) -> Any:
        import pydicom

        from observability.status_page import PatientLabel

        for record in self.store.instances(study_uid):
            try:
                ds = pydicom.dcmread(record.path, stop_before_pixels=True)
            except Exception:
                continue
            return PatientLabel(str(ds.get("PatientName", "")), str(ds.get("PatientID", "")))
        return None

    def index(self) -> str:
        from observability.status_page import render_index

        views = self.store.recent(self.limit)
        patients = None
        if self.show_phi:
            patients = {
                v.study_instance_uid: p
                for v in views
                if (p := self._patient(v.study_instance_uid)) is not None
            }
        return render_index(views, counts=self.store.count_by_state(), patients=patients)

    def study(self, study_uid: str) -> str | None:
        from observability.status_page import read_sr_boxes, render_study

        view = self.store.get(study_uid)
        if view is None:
            return None
        boxes = read_sr_boxes(view.result_paths)
        return render_study(
            view,
            self.store.events(study_uid),
            boxes=boxes,
            has_preview=view.instance_count > 0,
            patient=self._patient(study_uid) if self.show_phi else None,
        )

    def preview(self, study_uid: str) -> bytes | None:
        """The preview PNG: the image the boxes refer to (else the first CR/DX instance)."""
        import pydicom

        from observability.status_page import read_sr_boxes, render_preview

        view = self.store.get(study_uid)
        if view is None:
            return None
        key = (study_uid, view.result_paths)
        with self._lock:
            if key in self._previews:
                return self._previews[key]
        boxes = read_sr_boxes(view.result_paths)
        records = self.store.instances(study_uid)
        referenced = {b.sop_instance_uid for b in boxes}
        chosen = [r for r in records if r.sop_instance_uid in referenced] or [
            r for r in records if r.modality in ("CR", "DX")
        ]
        if not chosen:
            return None
        png = render_preview(pydicom.dcmread(chosen[0].path), boxes)
        with self._lock:
            self._previews[key] = png
            while len(self._previews) > 32:
                self._previews.popitem(last=False)
        return png
