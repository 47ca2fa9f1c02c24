"""The status page's I/O: studies from the study database, headers and previews from the spool.

Rendering is pure (:mod:`observability.status_page`); this module reads what it renders. Spooled
files are read through :mod:`dicom_node.instance_file`: the patient label from the header alone
(a Deflated one inflated at most a few megabytes), the preview only when the image's pixel data
is within ``max_pixel_bytes`` (``D2R_MAX_PIXEL_BYTES``), one preview decoded at a time; a larger
image has no preview (the endpoint answers 404).

The section "Signed reports and agreement" reads its figures through the ``agreement`` callable
the node passes (:meth:`cli.node.Node.agreement_report`) and is rendered (its plot included) at
most once per ``agreement_seconds``: page loads in between get the same HTML, so a page load
does not query the scores and plot them each time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from dicom_node.errors import InstanceRejected
from dicom_node.instance_file import read_instance, read_instance_header
from dicom_node.settings import DEFAULT_MAX_PIXEL_BYTES
from studydb.views import Views

__all__ = ["AGREEMENT_SECONDS", "StatusPages"]

logger = logging.getLogger(__name__)

#: how long the rendered agreement section is served before it is made again
AGREEMENT_SECONDS = 60.0


class StatusPages:
    """The status page's view of a study store (I/O around :mod:`observability.status_page`).

    Parameters
    ----------
    store : Views
        The study database's read views.
    show_phi : bool
        Show patient name and ID, read from the first instance's header.
    limit : int
        Studies on the index page.
    max_pixel_bytes : int
        Largest pixel data decoded for a preview (``D2R_MAX_PIXEL_BYTES``).
    agreement : callable, optional
        The figures of the section "Signed reports and agreement"
        (:func:`feedback.scoring.windowed_report`); None: no section.
    agreement_seconds : float
        How long a rendered agreement section is served again.
    """

    def __init__(
        self,
        store: Views,
        *,
        show_phi: bool = False,
        limit: int = 50,
        max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES,
        agreement: Callable[[], Mapping[str, Any]] | None = None,
        agreement_seconds: float = AGREEMENT_SECONDS,
    ) -> None:
        self.store = store
        self.show_phi = show_phi
        self.limit = limit
        self.max_pixel_bytes = max_pixel_bytes
        self.agreement = agreement
        self.agreement_seconds = agreement_seconds
        self._agreement_html: tuple[float, str] | None = None
        self._agreement_lock = threading.Lock()
        self._previews: OrderedDict[tuple[str, tuple[str, ...]], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._render_lock = threading.Lock()

    def _patient(self, study_uid: str) -> Any:
        from observability.status_page import PatientLabel

        for record in self.store.instances(study_uid):
            try:
                ds = read_instance_header(record.path)
            except (InstanceRejected, OSError):
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
        return render_index(
            views,
            counts=self.store.count_by_state(),
            queued=self.store.count_by_priority(),
            patients=patients,
            agreement=self.agreement_section(),
        )

    def agreement_section(self) -> str:
        """The section "Signed reports and agreement" (empty without ``agreement``), made
        again when the last one is older than ``agreement_seconds``."""
        source = self.agreement
        if source is None:
            return ""
        with self._agreement_lock:  # one render at a time; the others then take its result
            cached = self._agreement_html
            if cached is not None and time.monotonic() - cached[0] < self.agreement_seconds:
                return cached[1]
            section, lasting = self._render_agreement(source)
            self._agreement_html = (time.monotonic(), section) if lasting else None
            return section

    @staticmethod
    def _render_agreement(source: Callable[[], Mapping[str, Any]]) -> tuple[str, bool]:
        """The section, and whether to serve it again (not when the figures failed)."""
        from feedback.plots import agreement_svg
        from observability.status_page import render_agreement

        try:
            report = source()
        except Exception as exc:  # the rest of the page still answers while the figures fail
            logger.warning("cannot read the signed-report agreement: %s", type(exc).__name__)
            note = "The agreement figures cannot be read now."
            return render_agreement(None, "", note=note), False
        if not report["days"]:
            note = "No signed report scored in this window."
            return render_agreement(report, "", note=note), True
        try:
            svg = agreement_svg(report["days"])
        except ImportError:  # an image without matplotlib: the tables alone
            svg, note = "", "No plot here: matplotlib is not installed."
        except Exception as exc:  # a plot that fails leaves the tables
            logger.warning("cannot plot the signed-report agreement: %r", exc)
            svg, note = "", "The plot failed; the tables follow."
        else:
            note = ""
        return render_agreement(report, svg, note=note), True

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
        """The preview PNG: the image the boxes refer to (else the first CR/DX instance).

        None (no preview) when there is no such image, or it cannot be read, or its pixel data
        exceeds ``max_pixel_bytes``.
        """
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
        with self._render_lock:  # one image decoded at a time, however many requests wait
            try:
                image = read_instance(chosen[0].path, max_pixel_bytes=self.max_pixel_bytes)
            except (InstanceRejected, OSError) as exc:  # PixelDataTooLarge included
                logger.warning("no preview of study %s: %s", study_uid, exc)
                return None
            try:
                png = render_preview(image, boxes)
            except BaseException as exc:  # a malformed image: whatever pydicom, numpy or PIL
                # raise, and a Rust decoder's panic (pyo3's PanicException, a BaseException)
                if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
                    raise
                logger.warning(
                    "no preview of study %s: cannot render its image (%s)",
                    study_uid,
                    type(exc).__name__,
                )
                return None
        with self._lock:
            self._previews[key] = png
            while len(self._previews) > 32:
                self._previews.popitem(last=False)
        return png
