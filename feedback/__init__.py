"""Signed reports back, and what the node learns from them: the radiologist's final report of
a study d2r drafted, the draft scored against it, the drift of the inputs, and the export that
turns the pairs into training data.

Intake, three routes to one matching path (:mod:`feedback.match`): HL7 v2 ORU^R01
(:mod:`feedback.oru`, over the MLLP listener :mod:`feedback.hl7_listener` when
``D2R_HL7_LISTEN_PORT`` is set), a FHIR DiagnosticReport posted to the HTTP endpoint
(:mod:`feedback.fhir`) and a verified DICOM SR sent by the PACS (:mod:`feedback.dicom_sr`).
The reports are stored by :mod:`studydb.feedback`.

Measures: :mod:`feedback.scoring` (agreement of draft and signed report),
:mod:`feedback.drift` (the inputs and outputs against the checkpoint's calibration),
:mod:`feedback.plots` and :mod:`feedback.report_page` (the figures as a page), and
:mod:`feedback.export` (the training-data export of ``d2r feedback export``).
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
