"""Which images of a study go to the model (pure; no I/O).

Rules, applied in order; the first rule that leaves nothing gives the skip reason:

1. SOP class: CR Image Storage, Digital X-Ray Image Storage (For Presentation or For
   Processing) or Secondary Capture Image Storage.
   Reason: ``"no chest radiograph: SOP class <uid>"``.
2. Modality CR or DX (this is also what admits a Secondary Capture: a SC image with
   any other Modality, e.g. ``OT`` or ``DOC``, is not used).
   Reason: ``"no chest radiograph: modality CT"``.
3. Body Part Examined is chest-like (``CHEST``, ``THORAX``, ``LUNG`` and a few spellings,
   case-insensitive, see :data:`CHEST_BODY_PARTS`). An **empty** Body Part Examined is
   accepted: it is type 2 in the CR/DX modules and many CR devices leave it empty, and
   the study reached a chest-radiograph node. A non-empty other value excludes the image.
   Reason: ``"no chest radiograph: body part KNEE"``.
4. View: frontal only. ``PA`` is preferred over ``AP``; an **empty** View Position counts
   as frontal but only when no image says PA or AP. Laterals (``LL``, ``RL``,
   ``LATERAL``, ...), obliques and decubitus views are never used.
   Reason: ``"lateral views only"`` or ``"no frontal view: view position LLO"``.

Of the images left, only those of the most preferred view tier are returned, and of
those only the most preferred SOP class tier (CR / DX For Presentation, then DX For
Processing, then Secondary Capture), ordered by reception time then SOP Instance UID.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from studydb.records import InstanceRecord

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "CHEST_BODY_PARTS",
    "FRONTAL_VIEWS",
    "LATERAL_VIEWS",
    "Selection",
    "select_images",
]

CR_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION: Final = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING: Final = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE: Final = "1.2.840.10008.5.1.4.1.1.7"

#: SOP class -> preference tier (lower is better)
ACCEPTED_SOP_CLASSES: Final = {
    CR_IMAGE_STORAGE: 0,
    DX_FOR_PRESENTATION: 0,
    DX_FOR_PROCESSING: 1,
    SECONDARY_CAPTURE: 2,
}
RADIOGRAPHY_MODALITIES: Final = frozenset({"CR", "DX"})
#: normalised (upper case, no spaces/underscores/hyphens) chest-like Body Part Examined values
CHEST_BODY_PARTS: Final = frozenset({"CHEST", "THORAX", "TORAX", "LUNG", "LUNGS", "CXR", "PECHO"})
#: View Position -> preference tier; "" (empty) is the last frontal tier
FRONTAL_VIEWS: Final = {"PA": 0, "AP": 1, "": 2}
LATERAL_VIEWS: Final = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"})


@dataclass(frozen=True)
class Selection:
    """The images chosen for the model, or why none was.

    Attributes
    ----------
    images : tuple of InstanceRecord
        Chosen images, best first; empty when the study is skipped.
    skip_reason : str or None
        Set exactly when ``images`` is empty.
    """

    images: tuple[InstanceRecord, ...]
    skip_reason: str | None

    @property
    def skipped(self) -> bool:
        """True when nothing in the study is eligible."""
        return not self.images


def _norm(value: str) -> str:
    return "".join(ch for ch in value.upper() if ch not in " _-")


def is_chest_body_part(body_part_examined: str) -> bool:
    """Apply rule 3: chest-like or empty."""
    value = _norm(body_part_examined)
    return not value or value in CHEST_BODY_PARTS or value.startswith("CHEST")


def _values(items: Iterable[str]) -> str:
    return ", ".join(sorted({v or "(empty)" for v in items}))


def select_images(records: Iterable[InstanceRecord]) -> Selection:
    """Choose the images of one study to send to the model.

    >>> select_images([]).skip_reason
    'no instances'
    """
    items = list(records)
    if not items:
        return Selection((), "no instances")
    stage = [r for r in items if r.sop_class_uid in ACCEPTED_SOP_CLASSES]
    if not stage:
        return Selection(
            (), f"no chest radiograph: SOP class {_values(r.sop_class_uid for r in items)}"
        )
    previous, stage = stage, [r for r in stage if r.modality.upper() in RADIOGRAPHY_MODALITIES]
    if not stage:
        return Selection(
            (), f"no chest radiograph: modality {_values(r.modality for r in previous)}"
        )
    previous, stage = stage, [r for r in stage if is_chest_body_part(r.body_part_examined)]
    if not stage:
        parts = _values(r.body_part_examined for r in previous)
        return Selection((), f"no chest radiograph: body part {parts}")
    views = {id(r): _norm(r.view_position) for r in stage}
    frontal = [r for r in stage if views[id(r)] in FRONTAL_VIEWS]
    if not frontal:
        if all(views[id(r)] in LATERAL_VIEWS for r in stage):
            return Selection((), "lateral views only")
        return Selection(
            (), f"no frontal view: view position {_values(r.view_position for r in stage)}"
        )
    best_view = min(FRONTAL_VIEWS[views[id(r)]] for r in frontal)
    frontal = [r for r in frontal if FRONTAL_VIEWS[views[id(r)]] == best_view]
    best_class = min(ACCEPTED_SOP_CLASSES[r.sop_class_uid] for r in frontal)
    chosen = sorted(
        (r for r in frontal if ACCEPTED_SOP_CLASSES[r.sop_class_uid] == best_class),
        key=lambda r: (r.received_at, r.sop_instance_uid),
    )
    return Selection(tuple(chosen), None)
