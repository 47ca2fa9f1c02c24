"""The 22 VinDr-CXR local (box-level) labels, the detector's classes, and the 14 CheXpert
report observations.

The VinDr-CXR order is the column order of the PhysioNet VinDr-CXR 1.0.0 label files; class
index ``i`` of the detector is ``VINDR_CLASSES[i]``. The CheXpert order is the CheXpert
labeler's; output ``j`` of the global branch's observation head is ``CHEXPERT_OBSERVATIONS[j]``.
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

CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

__all__ = ["CHEXPERT_OBSERVATIONS", "VINDR_CLASSES"]
