"""The read-only status page: recent studies, one study's timeline, and a preview of the boxes.

Pure functions from values to HTML or PNG bytes; :mod:`observability.http` does the I/O. Every value
shown is escaped with :func:`html.escape`. Patient name and ID appear only when the caller passes
them (``D2R_STATUS_PAGE_PHI=true``); by default the page shows UIDs only.

The index ends with the section "Signed reports and agreement" when the node passes it
(:func:`render_agreement`): the daily plot of the sliding window (SVG, made by
:mod:`feedback.plots`) and the per-observation tables of the window and of all time
(:mod:`feedback.report_page`).

The preview decodes the frontal image with pydicom (no torch), windows it to 8 bits, downscales
it and draws the lesion boxes read from the TID 1500 SR: each measurement group's ``Image Region``
SCOORD POLYLINE, in source-image pixel coordinates; in a group without one (the TID 1501 encoding,
``D2R_SR_ROI_ENCODING=tid1501``), the POLYLINE its first NUM is INFERRED FROM.
"""

from __future__ import annotations

import html
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

from studydb.records import DONE, Event, StudyView

__all__ = [
    "BOX_COLOUR",
    "Box",
    "PatientLabel",
    "boxes_from_sr",
    "read_sr_boxes",
    "render_agreement",
    "render_index",
    "render_preview",
    "render_study",
    "window_to_uint8",
]

#: RGB colour of the drawn boxes (never a grey level, so it cannot come from the image)
BOX_COLOUR = (255, 32, 32)
FINDING = "121071"  # (121071, DCM, "Finding")
IMAGE_REGION = "111030"  # (111030, DCM, "Image Region")


@dataclass(frozen=True)
class Box:
    """One lesion region of an SR, in source-image pixel coordinates."""

    sop_instance_uid: str
    label: str
    points: tuple[tuple[float, float], ...]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)``."""
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        return min(xs), min(ys), max(xs), max(ys)


@dataclass(frozen=True)
class PatientLabel:
    """What the page may show of a patient when ``D2R_STATUS_PAGE_PHI`` is true."""

    name: str
    patient_id: str


def _code_value(item: Dataset, attribute: str) -> str | None:
    seq = item.get(attribute)
    return str(seq[0].CodeValue) if seq else None


def _walk_groups(items: Iterable[Dataset]) -> Iterable[Dataset]:
    for item in items:
        if item.get("ValueType") == "CONTAINER":
            yield item
            yield from _walk_groups(item.get("ContentSequence", []))


def _polyline_box(scoord: Dataset, label: str) -> Box | None:
    data = [float(v) for v in scoord.GraphicData]
    points = tuple(zip(data[0::2], data[1::2], strict=True))
    ref = ""
    for image in scoord.get("ContentSequence", []):
        refs = image.get("ReferencedSOPSequence")
        if image.get("ValueType") == "IMAGE" and refs:
            ref = str(refs[0].ReferencedSOPInstanceUID)
    return Box(sop_instance_uid=ref, label=label, points=points) if points else None


def _is_polyline(item: Dataset) -> bool:
    return bool(item.get("ValueType") == "SCOORD" and item.get("GraphicType") == "POLYLINE")


def boxes_from_sr(ds: Dataset) -> list[Box]:
    """The POLYLINE image regions of a TID 1500 SR, labelled with their finding.

    A group's own SCOORDs (TID 1410); a group without any gives the POLYLINE its first NUM
    is INFERRED FROM (TID 1501), so each box is read once in either encoding.
    """
    boxes = []
    for group in _walk_groups([ds]):
        children = group.get("ContentSequence", [])
        label = ""
        for child in children:
            if (
                child.get("ValueType") == "CODE"
                and _code_value(child, "ConceptNameCodeSequence") == FINDING
            ):
                label = str(child.ConceptCodeSequence[0].CodeMeaning)
        scoords = [child for child in children if _is_polyline(child)]
        if not scoords:
            nums = [child for child in children if child.get("ValueType") == "NUM"]
            inferred = [
                i for i in (nums[0].get("ContentSequence", []) if nums else []) if _is_polyline(i)
            ]
            scoords = inferred[:1]
        for scoord in scoords:
            box = _polyline_box(scoord, label)
            if box is not None:
                boxes.append(box)
    return boxes


def read_sr_boxes(paths: Iterable[str]) -> list[Box]:
    """:func:`boxes_from_sr` over the SR files in ``paths`` (non-SR and missing files skipped)."""
    boxes: list[Box] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
        if ds.get("Modality") == "SR":
            boxes.extend(boxes_from_sr(ds))
    return boxes


def _first(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    return None if value is None else float(value)


#: pixels sampled for the percentile window of an image without one (the window of a preview
#: need not be exact; every pixel of an image up to this size)
_WINDOW_SAMPLE = 1 << 20


def _first_plane(ds: Dataset) -> np.ndarray:
    """The first frame of ``ds``; colour samples averaged to one grey plane."""
    pixels = np.asarray(ds.pixel_array)
    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1
    if pixels.ndim == (4 if colour else 3):
        pixels = pixels[0]  # first frame
    if colour and pixels.ndim == 3:
        pixels = pixels.mean(axis=-1, dtype=np.float32)
    return pixels


def _grey_levels(values: np.ndarray, ds: Dataset, sample: np.ndarray) -> np.ndarray:
    """Stored ``values`` -> 0-255 floats: rescale, window (from ``sample`` if the header has
    none), MONOCHROME1 inverted."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0))
    values = values * slope + intercept
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 1:
        low, high = center - width / 2.0, center + width / 2.0
    else:
        rescaled = sample.astype(np.float64) * slope + intercept
        low, high = (float(v) for v in np.percentile(rescaled, [0.5, 99.5]))
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0) * 255.0
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 255.0 - scaled
    return np.asarray(scaled)


def window_to_uint8(ds: Dataset) -> np.ndarray:
    """The image of ``ds`` as 8-bit grey (0 black): rescale, window, invert MONOCHROME1.

    The window is the header's first Window Center/Width, or the 0.5-99.5 percentiles (of at
    most about a million evenly spaced pixels). Integer images of up to 16 bits are mapped
    through a table of every stored value, so the only full-size array made besides the
    decoded pixels is the 8-bit result.
    """
    pixels = _first_plane(ds)
    flat = pixels.reshape(-1)
    sample = flat[:: max(1, flat.size // _WINDOW_SAMPLE)]
    if pixels.dtype.kind in "ui" and pixels.dtype.itemsize <= 2:
        unsigned = np.dtype(f"u{pixels.dtype.itemsize}")
        stored = np.arange(2 ** (8 * unsigned.itemsize), dtype=unsigned).view(pixels.dtype)
        table = np.round(_grey_levels(stored.astype(np.float64), ds, sample)).astype(np.uint8)
        return np.asarray(table[pixels.view(unsigned)])
    grey = _grey_levels(pixels.astype(np.float32), ds, sample)
    return np.asarray(np.round(grey), dtype=np.uint8)


def render_preview(ds: Dataset, boxes: Sequence[Box], *, max_size: int = 512) -> bytes:
    """A PNG of the image of ``ds``, at most ``max_size`` pixels wide and high, with ``boxes``.

    Boxes referring to another image are left out; coordinates are scaled with the image.
    """
    grey = Image.fromarray(window_to_uint8(ds))
    rows, cols = grey.height, grey.width
    scale = min(1.0, max_size / max(rows, cols))
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    image = grey.resize(size, Image.Resampling.LANCZOS).convert("RGB")
    draw = ImageDraw.Draw(image)
    uid = str(ds.get("SOPInstanceUID", ""))
    width = max(2, round(max(size) / 200))
    for box in boxes:
        if box.sop_instance_uid and box.sop_instance_uid != uid:
            continue
        x0, y0, x1, y1 = (round(v * scale) for v in box.bounds)
        x0, x1 = (min(max(x, 0), size[0] - 1) for x in (x0, x1))
        y0, y1 = (min(max(y, 0), size[1] - 1) for y in (y0, y1))
        draw.rectangle((x0, y0, x1, y1), outline=BOX_COLOUR, width=width)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------------- HTML
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}
th{background:#eee}.done{color:#070}.failed{color:#b00}.skipped{color:#777}
.uid{font-family:monospace;font-size:.9em}svg{max-width:100%;height:auto}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _time(at: float | None) -> str:
    if at is None:
        return ""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def end_to_end_seconds(view: StudyView) -> float | None:
    """First instance received -> finished, for a ``done`` study."""
    if view.state != DONE or view.finished_at is None:
        return None
    return view.finished_at - view.first_received_at


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _study_href(uid: str) -> str:
    return "studies/" + quote(uid, safe="")


def render_index(
    views: Sequence[StudyView],
    *,
    counts: Mapping[str, int] | None = None,
    queued: Mapping[str, int] | None = None,
    patients: Mapping[str, PatientLabel] | None = None,
    title: str = "d2r",
    agreement: str = "",
) -> str:
    """The recent-studies page; ``queued``: queued studies by priority; ``patients`` (study
    UID -> label) only with PHI enabled; ``agreement``: the section :func:`render_agreement`
    made, appended as it is."""
    parts = [f"<h1>{_e(title)}: recent studies</h1>"]
    if counts:
        parts.append(
            "<p id=counts>"
            + ", ".join(f"{_e(state)}: {int(n)}" for state, n in counts.items())
            + "</p>"
        )
    if queued:
        parts.append(
            "<p id=queued>queued by priority: "
            + ", ".join(f"{_e(p)}: {int(n)}" for p, n in queued.items())
            + "</p>"
        )
    head = ["Study Instance UID", "State", "Priority", "Reason", "Instances", "Received", "Queued"]
    head += ["Processed", "Finished", "End-to-end (s)", "Model", "Lesions", "Impression"]
    if patients is not None:
        head[1:1] = ["Patient", "Patient ID"]
    parts.append("<table id=studies><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for v in views:
        e2e = end_to_end_seconds(v)
        cells = [
            f'<a class=uid href="{_e(_study_href(v.study_instance_uid))}">'
            f"{_e(v.study_instance_uid)}</a>",
            f"<span class={_e(v.state)}>{_e(v.state)}</span>",
            f"<span class=priority-{_e(v.priority)}>{_e(v.priority)}</span>",
            _e(v.reason),
            _e(v.instance_count),
            _e(_time(v.first_received_at)),
            _e(_time(v.queued_at)),
            _e(_time(v.processed_at)),
            _e(_time(v.finished_at)),
            _e(f"{e2e:.1f}" if e2e is not None else ""),
            _e(" ".join(x for x in (v.model_name, v.model_version) if x)),
            _e(v.lesion_count),
            _e(v.impression),
        ]
        if patients is not None:
            label = patients.get(v.study_instance_uid)
            cells[1:1] = [_e(label.name if label else ""), _e(label.patient_id if label else "")]
        parts.append(
            f'<tr data-study="{_e(v.study_instance_uid)}">'
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    parts.append("</table>")
    parts.append(agreement)
    return _page(title, "".join(parts))


def render_agreement(report: Mapping[str, Any] | None, plot_svg: str, *, note: str = "") -> str:
    """The section "Signed reports and agreement" of the index.

    ``report`` is :func:`feedback.scoring.windowed_report`'s (None: the figures could not be
    read, ``note`` says why); ``plot_svg`` the daily plot of its window (empty: none, ``note``
    may say why).
    """
    from feedback.report_page import LABELS_NOTE, figures_table, observation_table

    parts = ["<section id=agreement><h2>Signed reports and agreement</h2>"]
    if report is None:
        parts.append(f"<p>{_e(note)}</p></section>")
        return "".join(parts)
    window = str(report["window"])
    summaries = report["summaries"]
    if not summaries["all"]["studies"]:
        parts.append(
            "<p>No signed report scored yet (docs/operations.md, "
            '"Signed reports and agreement").</p></section>'
        )
        return "".join(parts)
    parts.append(f"<h3>Last {_e(window)}, per day</h3>")
    if plot_svg:
        parts.append(f"<figure id=agreement-plot>{plot_svg}</figure>")
    elif note:
        parts.append(f"<p>{_e(note)}</p>")
    for label, heading in ((window, f"Last {window}"), ("all", "All time")):
        key = "all" if label == "all" else "window"
        parts.append(
            f"<h3>{_e(heading)}</h3>"
            + figures_table(summaries[label], table_id=f"agreement-{key}")
            + observation_table(summaries[label], table_id=f"observations-{key}")
        )
    parts.append(
        "<p>AI only: the draft states it, the signed report does not; radiologist only: the "
        f"reverse. {_e(LABELS_NOTE)}</p></section>"
    )
    return "".join(parts)


# Longer than a screen: an HTML page template: one section per part of the study
def render_study(
    view: StudyView,
    events: Sequence[Event],
    *,
    boxes: Sequence[Box] = (),
    has_preview: bool = False,
    patient: PatientLabel | None = None,
) -> str:
    """One study: timings, report text, deliveries, boxes, event timeline and the preview."""
    e2e = end_to_end_seconds(view)
    rows = [
        ("Study Instance UID", view.study_instance_uid),
        ("State", view.state),
        ("Priority", view.priority),
        ("Reason", view.reason),
        ("Instances", view.instance_count),
        ("Received", _time(view.first_received_at)),
        ("Last instance", _time(view.last_received_at)),
        ("Queued", _time(view.queued_at)),
        ("Processed", _time(view.processed_at)),
        ("Finished", _time(view.finished_at)),
        ("End-to-end (s)", f"{e2e:.1f}" if e2e is not None else ""),
        ("Model", " ".join(x for x in (view.model_name, view.model_version) if x)),
        ("Lesions", view.lesion_count),
        ("Findings", view.findings),
        ("Impression", view.impression),
    ]
    if patient is not None:
        rows[1:1] = [("Patient", patient.name), ("Patient ID", patient.patient_id)]
    parts = [
        f'<p><a href="../">all studies</a></p><h1>Study {_e(view.study_instance_uid)}</h1>',
        "<table id=study>"
        + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
        + "</table>",
    ]
    if has_preview:
        src = _study_href(view.study_instance_uid).removeprefix("studies/") + "/preview.png"
        parts.append(
            f'<h2>Preview</h2><img id=preview alt="preview with the predicted boxes" '
            f'src="{_e(src)}">'
        )
    if boxes:
        parts.append(
            "<h2>Lesions</h2><table id=boxes><tr><th>Finding</th><th>Box (source pixels)</th></tr>"
            + "".join(
                f"<tr><td>{_e(b.label)}</td><td>{_e(', '.join(f'{v:.0f}' for v in b.bounds))}"
                "</td></tr>"
                for b in boxes
            )
            + "</table>"
        )
    if view.deliveries:
        parts.append(
            "<h2>Deliveries</h2><table id=deliveries><tr><th>Destination</th><th>State</th>"
            "<th>Attempts</th><th>Sent</th><th>Last error</th></tr>"
            + "".join(
                f"<tr><td>{_e(d.destination)}</td><td>{_e(d.state)}</td><td>{_e(d.attempts)}</td>"
                f"<td>{_e(_time(d.sent_at))}</td><td>{_e(d.last_error)}</td></tr>"
                for d in view.deliveries
            )
            + "</table>"
        )
    parts.append(
        "<h2>Events</h2><table id=events><tr><th>Time</th><th>Event</th><th>Detail</th></tr>"
        + "".join(
            f"<tr><td>{_e(_time(ev.at))}</td><td>{_e(ev.kind)}</td><td>{_e(ev.detail)}</td></tr>"
            for ev in events
        )
        + "</table>"
    )
    return _page(f"d2r study {view.study_instance_uid}", "".join(parts))
