"""The report content every destination sends, in one JSON file beside the study's SRs.

The worker writes ``report.json`` with the SRs (same folder, same durable write) from the
prediction; the HL7 and FHIR senders read it instead of parsing the SR content tree back. It
holds no patient data: patient and order identifiers come from the SR headers, which copy the
source image's Patient and General Study modules.

>>> c = DeliveryContent(findings="Small left effusion.", impression="Effusion.",
...     lesions=(FindingBox("Pleural effusion", 0.47, (10.0, 20.0, 30.0, 40.0),
...                         sentence="Small left effusion."),),
...     model_name="d2r-net", model_version="3.1.0", sr_sop_instance_uid="1.2.3")
>>> DeliveryContent.from_json(c.to_json()) == c
True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CONTENT_FILE", "FindingBox", "DeliveryContent"]

#: name of the content file in a study's results folder
CONTENT_FILE = "report.json"


@dataclass(frozen=True)
class FindingBox:
    """One lesion as the report presents it."""

    #: one of the 22 VinDr-CXR local labels (``d2r_core.classes``)
    class_name: str
    score: float
    #: x_min, y_min, x_max, y_max in source-image pixels
    box: tuple[float, float, float, float]
    #: the findings sentence the box supports (None: not tied to a sentence)
    sentence: str | None = None
    #: the Tracking Unique Identifier of its TID 1500 measurement group, when known
    tracking_uid: str | None = None


@dataclass(frozen=True)
class DeliveryContent:
    """A study's draft report as the model produced it (no patient data)."""

    findings: str
    impression: str
    lesions: tuple[FindingBox, ...]
    model_name: str
    model_version: str
    #: SOP Instance UID of the TID 1500 SR (the lesion boxes) sent with this content
    sr_sop_instance_uid: str
    #: the image the boxes refer to
    image_sop_instance_uid: str = ""
    abstained: bool = False
    abstain_reason: str = ""
    input_gate: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), the bytes the worker writes."""
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeliveryContent:
        """Parse :meth:`to_json`'s output.

        Raises
        ------
        ValueError
            When the text is not a report content document.
        """
        try:
            data = json.loads(text)
            lesions = tuple(
                FindingBox(
                    class_name=str(item["class_name"]),
                    score=float(item["score"]),
                    box=(
                        float(item["box"][0]),
                        float(item["box"][1]),
                        float(item["box"][2]),
                        float(item["box"][3]),
                    ),
                    sentence=item.get("sentence"),
                    tracking_uid=item.get("tracking_uid"),
                )
                for item in data.pop("lesions")
            )
            return cls(lesions=lesions, **data)
        except (KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a d2r report content document: {exc}") from exc
