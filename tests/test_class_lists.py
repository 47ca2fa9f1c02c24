"""The detector's classes and the SR's finding table are one list, held by the kernel.

``model`` and ``report`` may not import each other (see the import-linter contracts); both read
the 22 VinDr-CXR strings from :mod:`d2r_core.classes`, and the SR's code table covers them all.
"""

from d2r_core.classes import VINDR_CLASSES as MODEL_CLASSES
from d2r_core.classes import VINDR_CLASSES as REPORT_CLASSES
from report.codes import FINDING_CODES


def test_model_and_report_share_the_class_list() -> None:
    assert tuple(MODEL_CLASSES) == tuple(REPORT_CLASSES)
    assert len(MODEL_CLASSES) == 22


def test_every_detector_class_has_a_finding_code() -> None:
    assert set(FINDING_CODES) == set(MODEL_CLASSES)
