"""Write a phantom data set to disk: PNG + ``annotation.json``, DICOM + ``studies.jsonl``.

Layout under the output folder::

    images/<id>.png                 8-bit grayscale, ``size`` x ``size``
    annotation.json                 R2Gen-style splits with D2R-Net box fields
    dicom/<study_id>/<image_id>.dcm CR or DX For Presentation, square, 12 bits in 16
    studies.jsonl                   per study: DICOM and PNG paths, lesions in DICOM pixels,
                                    and each finding sentence with its lesions (gt_sentences)

Support devices (endotracheal tube, central venous catheter) have no box: they are listed per
study under ``devices`` (kinds), apart from the boxed ``labels`` / ``gt_lesions``.

Everything is a function of the configuration: the same seed gives byte-identical files
(UIDs derive from the seed, dates are fixed). Synthetic data, not for clinical use.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from training.phantom import DEVICE_FRACTION, PhantomStudy, render, sample_study
from training.phantom_report import write_report

logger = logging.getLogger(__name__)

PHANTOM_MANUFACTURER = "d2r synthetic phantom"
_FIELD_OF_VIEW_MM = 430.0
_BITS_STORED = 12
_STUDY_DATE = "20260101"
#: CID 4010 view codes (SNOMED CT) for ViewCodeSequence.
_VIEW_CODES = {"PA": ("272479007", "postero-anterior"), "AP": ("399348003", "antero-posterior")}


@dataclass(frozen=True)
class PhantomConfig:
    """What ``d2r synth`` generates.

    Parameters
    ----------
    studies : int
        Number of studies.
    seed : int
        Base seed; study ``i`` uses the stream ``[seed, i]``.
    size : int
        Side of the training PNGs (pixels).
    dicom_size : int
        Side of the DICOM images (pixels); 0 writes no DICOM.
    normal_fraction : float
        Share of studies without lesions.
    device_fraction : float
        Probability of support devices in a study (doubled, up to 1, with edema or
        consolidation); see :func:`training.phantom.sample_study`.
    val_fraction, test_fraction : float
        Shares of the ``val`` and ``test`` splits (assigned by study index).
    """

    studies: int
    seed: int = 0
    size: int = 512
    dicom_size: int = 1024
    normal_fraction: float = 0.3
    device_fraction: float = DEVICE_FRACTION
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.studies < 1:
            raise ValueError(f"studies: must be at least 1, got {self.studies}")
        if self.size < 64:
            raise ValueError(f"size: must be at least 64, got {self.size}")
        if self.dicom_size and self.dicom_size < 64:
            raise ValueError(f"dicom_size: must be 0 or at least 64, got {self.dicom_size}")
        if not 0.0 <= self.normal_fraction <= 1.0:
            raise ValueError(f"normal_fraction: must be in [0, 1], got {self.normal_fraction}")
        if not 0.0 <= self.device_fraction <= 1.0:
            raise ValueError(f"device_fraction: must be in [0, 1], got {self.device_fraction}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction, test_fraction: must leave a training split")


def split_of(index: int, config: PhantomConfig) -> str:
    """Deterministic split of study ``index``: spread evenly over the index range."""
    pos = (index * 0.6180339887) % 1.0
    if pos < config.test_fraction:
        return "test"
    if pos < config.test_fraction + config.val_fraction:
        return "val"
    return "train"


def _to_pixels(img: np.ndarray, bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    return np.round(np.asarray(img, dtype=np.float64) * top).astype(
        np.uint16 if bits > 8 else np.uint8
    )


def build_dicom(study: PhantomStudy, image: np.ndarray, study_id: str) -> Dataset:
    """Return a CR or DX (For Presentation) dataset holding ``image`` (pure)."""
    rng = np.random.default_rng([study.seed, study.index, 11])
    modality = "DX" if rng.random() < 0.5 else "CR"
    view = "PA" if rng.random() < 0.8 else "AP"
    mono1 = modality == "CR" and rng.random() < 0.4
    size = image.shape[0]
    pixels = _to_pixels(image, _BITS_STORED)
    if mono1:
        pixels = ((1 << _BITS_STORED) - 1 - pixels).astype(np.uint16)
    sop_class = (
        DigitalXRayImageStorageForPresentation
        if modality == "DX"
        else (ComputedRadiographyImageStorage)
    )
    entropy = [str(study.seed), str(study.index)]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "image"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{8 + study.index % 10:02d}0000"
    ds.AccessionNumber = f"PH{study.seed % 10000:04d}{study.index:06d}"
    ds.Modality = modality
    ds.Manufacturer = PHANTOM_MANUFACTURER
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC PHANTOM CHEST"
    ds.SeriesDescription = f"Synthetic phantom chest {view}"
    ds.PatientName = f"PHANTOM^{study_id}"
    ds.PatientID = f"PHANTOM-{study_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
    ds.StudyID = str(study.index)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"] if view == "PA" else ["R", "F"]
    region = Dataset()
    region.CodeValue = "816094009"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = Sequence([region])
    spacing = round(_FIELD_OF_VIEW_MM / size, 6)
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS_STORED
    ds.HighBit = _BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.ImageLaterality = "U"
        code = Dataset()
        code.CodeValue, code.CodeMeaning = _VIEW_CODES[view]
        code.CodingSchemeDesignator = "SCT"
        code.ViewModifierCodeSequence = Sequence()
        ds.ViewCodeSequence = Sequence([code])
        ds.PositionerType = "COLUMN"
        ds.AcquisitionContextSequence = Sequence()
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
    else:
        ds.PixelSpacing = [spacing, spacing]
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def _png_bytes_path(out: Path, image_id: str) -> Path:
    return out / "images" / f"{image_id}.png"


def generate(config: PhantomConfig, out: Path) -> dict[str, Any]:
    """Generate the phantom data set under ``out`` and return a summary.

    Returns
    -------
    dict
        ``studies``, ``lesions`` (count of boxed lesions per class; bilateral edema counts
        one per lung), ``devices`` (count of studies per device kind), ``splits`` (count per
        split).
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    manifest: list[str] = []
    counts: dict[str, int] = {}
    device_counts: dict[str, int] = {}
    for index in range(config.studies):
        study = sample_study(
            config.seed,
            index,
            normal_fraction=config.normal_fraction,
            device_fraction=config.device_fraction,
        )
        report = write_report(study)
        study_id = f"s{config.seed}-{index:05d}"
        image_id = f"{study_id}-pa"
        rendered = render(study, config.size)
        png = _png_bytes_path(out, image_id)
        Image.fromarray(_to_pixels(rendered.image, 8)).save(png, format="PNG")
        split = split_of(index, config)
        names = [le.class_name for le in study.lesions]
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        for dev in study.devices:
            device_counts[dev.kind] = device_counts.get(dev.kind, 0) + 1
        s = config.size
        boxes_px = [[b[0] * s, b[1] * s, b[2] * s, b[3] * s] for b in rendered.boxes]
        splits[split].append(
            {
                "id": image_id,
                "study_id": study_id,
                "report": report.findings,
                "findings": report.findings,
                "impression": report.impression,
                "image_path": [f"{image_id}.png"],
                "split": split,
                "boxes": [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes_px],
                "labels": names,
                "scores": [1.0] * len(names),
                "laterality": [le.laterality for le in study.lesions],
                "devices": [dev.kind for dev in study.devices],
                "height": s,
                "width": s,
                "cardiothoracic_ratio": study.anatomy.cardiothoracic_ratio,
                "synthetic": True,
            }
        )
        entry: dict[str, Any] = {
            "id": study_id,
            "split": split,
            "png": f"images/{image_id}.png",
            "png_size": s,
            "findings": report.findings,
            "impression": report.impression,
            "reference": report.findings,
            "dicom": [],
            "gt_lesions": [],
            "devices": [dev.kind for dev in study.devices],
            # the findings sentences that state lesions, each with its lesions' indices in
            # gt_lesions: the true boxes of every finding sentence
            "gt_sentences": [
                {"text": text, "lesions": list(lesions)}
                for text, lesions in report.sentences
                if lesions
            ],
        }
        if config.dicom_size:
            big = render(study, config.dicom_size)
            ds = build_dicom(study, big.image, study_id)
            rel = Path("dicom") / study_id / f"{image_id}.dcm"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out / rel, enforce_file_format=True)
            d = config.dicom_size
            entry.update(
                dicom=[rel.as_posix()],
                study_instance_uid=str(ds.StudyInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                modality=str(ds.Modality),
                photometric_interpretation=str(ds.PhotometricInterpretation),
                rows=d,
                columns=d,
            )
            entry["gt_lesions"] = [
                {
                    "class_name": le.class_name,
                    "laterality": le.laterality,
                    "box": [b[0] * d, b[1] * d, b[2] * d, b[3] * d],
                }
                for le, b in zip(study.lesions, rendered.boxes, strict=True)
            ]
        else:
            entry["gt_lesions"] = [
                {"class_name": le.class_name, "laterality": le.laterality, "box": b}
                for le, b in zip(study.lesions, boxes_px, strict=True)
            ]
        manifest.append(json.dumps(entry, sort_keys=True))
    (out / "annotation.json").write_text(json.dumps(splits, indent=1, sort_keys=True) + "\n")
    (out / "studies.jsonl").write_text("\n".join(manifest) + "\n")
    summary = {
        "studies": config.studies,
        "lesions": dict(sorted(counts.items())),
        "devices": dict(sorted(device_counts.items())),
        "splits": {k: len(v) for k, v in splits.items()},
    }
    logger.info("phantom: %d studies written to %s", config.studies, out)
    return summary


__all__ = ["PHANTOM_MANUFACTURER", "PhantomConfig", "build_dicom", "generate", "split_of"]
