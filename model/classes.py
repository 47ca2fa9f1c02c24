"""The 22 VinDr-CXR local (box-level) labels, the detector's classes.

The order is the column order of the PhysioNet VinDr-CXR 1.0.0 label files;
class index ``i`` of the detector is ``VINDR_CLASSES[i]``.
"""

from __future__ import annotations

VINDR_CLASSES: tuple[str, ...] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Clavicle fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged PA",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Lung cavity",
    "Lung cyst",
    "Mediastinal shift",
    "Nodule/Mass",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "Rib fracture",
    "Other lesion",
)

__all__ = ["VINDR_CLASSES"]
