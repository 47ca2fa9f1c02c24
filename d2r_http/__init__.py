"""The HTTP endpoint every d2r process serves: the server (:mod:`d2r_http.server`), its route
table (:mod:`d2r_http.routes`), authentication (:mod:`d2r_http.auth`) and the credentials files
(:mod:`d2r_http.credentials`).

What is served is mounted by the packages that own it: :mod:`observability.http` (metrics,
probes, the status page), the node's STOW-RS receiver (:mod:`dicom_node.stow`) and its FHIR
endpoint for signed reports (:mod:`feedback.fhir`). This package imports none of them.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
