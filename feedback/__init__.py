"""Signed reports back from the RIS: the radiologist's final report of a study d2r drafted.

:mod:`feedback.oru` reads an HL7 v2 ORU^R01 and writes its acknowledgement,
:mod:`feedback.match` finds the study a report belongs to and decides what becomes of it, and
:mod:`feedback.hl7_listener` is the MLLP listener ``d2r node`` runs when
``D2R_HL7_LISTEN_PORT`` is set. The reports are stored by :mod:`studydb.feedback`.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
