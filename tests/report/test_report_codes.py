"""The VinDr-CXR class table in report.codes."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import codes

from d2r_core.classes import VINDR_CLASSES
from report.codes import (
    FINDING_CODES,
    PRIVATE_SCHEME_DESIGNATOR,
    finding_codes,
    private_coding_scheme,
)

# The 22 VinDr-CXR local labels, in the order of the PhysioNet label files.
EXPECTED_CLASSES = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
    "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
    "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion",
]  # fmt: skip


def test_table_covers_exactly_the_22_vindr_classes() -> None:
    assert list(VINDR_CLASSES) == EXPECTED_CLASSES
    assert set(FINDING_CODES) == set(EXPECTED_CLASSES)
    assert len(FINDING_CODES) == 22


@pytest.mark.parametrize(
    ("class_name", "code_value", "site_value"),
    [
        ("Cardiomegaly", "8186001", "80891009"),
        ("Pleural effusion", "60046008", "3120008"),
        ("Pneumothorax", "36118008", "3120008"),
        ("Edema", "19242006", "39607008"),
        ("Nodule/Mass", "27925004", "39607008"),
        ("Pulmonary fibrosis", "112674009", "39607008"),
        ("Lung cyst", "367643001", "39607008"),
        ("Other lesion", "52988006", None),
    ],
)
def test_verified_snomed_codes(class_name: str, code_value: str, site_value: str | None) -> None:
    entry = FINDING_CODES[class_name]
    assert entry.finding.scheme_designator == "SCT"
    assert entry.finding.value == code_value
    assert not entry.is_private
    assert (entry.finding_site.value if entry.finding_site else None) == site_value


def test_cardiomegaly_is_not_pydicoms_mislabelled_code() -> None:
    assert codes.SCT.Cardiomegaly.value == "287272002"  # the concept we must not use
    assert FINDING_CODES["Cardiomegaly"].finding.value != codes.SCT.Cardiomegaly.value


def test_private_codes_use_class_index_and_vindr_string() -> None:
    private = {name: entry for name, entry in FINDING_CODES.items() if entry.is_private}
    assert private, "some classes have no verified code"
    for name, entry in private.items():
        assert entry.finding.scheme_designator == PRIVATE_SCHEME_DESIGNATOR
        assert entry.finding.value == str(VINDR_CLASSES.index(name))
        assert entry.finding.meaning == name
    values = [entry.finding.value for entry in private.values()]
    assert len(set(values)) == len(values)


def test_finding_sites_are_snomed_body_structures() -> None:
    allowed = {"80891009", "3120008", "39607008", "15825003", "72410000", "113197003",
               "51299004", "81040000"}  # fmt: skip
    for entry in FINDING_CODES.values():
        if entry.finding_site is not None:
            assert entry.finding_site.scheme_designator == "SCT"
            assert entry.finding_site.value in allowed


def test_unknown_class_raises_value_error_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="class_name"):
        finding_codes("No finding")


def test_private_scheme_item() -> None:
    item = private_coding_scheme()
    assert item.CodingSchemeDesignator == PRIVATE_SCHEME_DESIGNATOR
    assert item.CodingSchemeName
