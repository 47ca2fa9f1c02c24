"""Values copied from a source image into the objects d2r writes, checked against their VR.

Every object d2r writes (the SRs, the presentation state, the overlay image) repeats the
patient, study and equipment attributes of the image it is about. A source may carry values its
own VR does not allow, e.g. a Secondary Capture whose Patient's Age is ``51`` (Age String needs
three digits and a unit, ``051Y``), a date written ``2023-01-01`` or a Long String over 64
characters. Copied as they are, they make every d2r object invalid. :func:`checked_header`
leaves such values out (an empty value for a Type 2 attribute) and names what it left out, so
the caller can record it; it never guesses a repair (``51`` could be days, weeks, months or
years).

>>> from pydicom.dataset import Dataset
>>> ds = Dataset(); ds.PatientAge = "51"; ds.PatientID = "P1"
>>> header, dropped = checked_header(ds)
>>> dropped, "PatientAge" in header, header.PatientID
(('PatientAge',), False, 'P1')
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

__all__ = [
    "COPIED_ATTRIBUTES",
    "checked_header",
    "dropped_in",
    "invalid_keywords",
    "source_header",
]

#: Patient, Patient Study, General Study and General Equipment attributes any d2r object may
#: take from its source image (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2, C.7.5.1).
COPIED_ATTRIBUTES: Final = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientSex",
        "OtherPatientIDs",
        "OtherPatientNames",
        "EthnicGroup",
        "PatientComments",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "AdmittingDiagnosesDescription",
        "Occupation",
        "AdditionalPatientHistory",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDescription",
        "PhysiciansOfRecord",
        "NameOfPhysiciansReadingStudy",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "Manufacturer",
        "ManufacturerModelName",
        "DeviceSerialNumber",
        "SoftwareVersions",
    }
)


#: Type 2 patient/study attributes highdicom copies from the source; empty when absent.
_TYPE2_SOURCE_ATTRIBUTES: Final = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PIXEL_DATA: Final = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData"})


def _valid(element: DataElement) -> bool:
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    try:
        for value in values:
            if value is not None and value != "":
                validate_value(element.VR, value, config.RAISE)
    except (ValueError, KeyError, TypeError):
        return False
    return True


def invalid_keywords(image: Dataset) -> tuple[str, ...]:
    """The keywords of :data:`COPIED_ATTRIBUTES` whose value in ``image`` its VR forbids."""
    return tuple(
        keyword
        for keyword in sorted(COPIED_ATTRIBUTES)
        if keyword in image and not _valid(image[keyword])
    )


def checked_header(image: Dataset) -> tuple[Dataset, tuple[str, ...]]:
    """A shallow copy of ``image`` without the copied values its VR forbids, and their keywords.

    The copy shares the source's elements (nothing is decoded or deep-copied); only the invalid
    elements are missing from it.
    """
    dropped = invalid_keywords(image)
    if not dropped:
        return image, ()
    header = Dataset()
    for element in image:
        if element.keyword not in dropped:
            header.add(element)
    if hasattr(image, "file_meta"):
        header.file_meta = image.file_meta
    return header, dropped


def dropped_in(images: Iterable[Dataset]) -> tuple[str, ...]:
    """The keywords :func:`checked_header` leaves out of any of ``images``, each once."""
    return tuple(sorted({kw for ds in images for kw in invalid_keywords(ds)}))


def source_header(image: Dataset) -> Dataset:
    """The header d2r's objects are built from: ``image`` without pixel data and without the
    values its VR forbids, with absent Type 2 patient and study attributes present and empty."""
    header = Dataset()
    left_out = _PIXEL_DATA | set(invalid_keywords(image))
    for element in image:
        if element.keyword not in left_out:
            header.add(element)
    for keyword in _TYPE2_SOURCE_ATTRIBUTES:
        if keyword not in header:
            setattr(header, keyword, None)
    return header
