"""Coverage-guided fuzzing of the node's input surfaces (atheris, libFuzzer).

Tooling, not runtime: nothing under ``cli``, ``dicom_node`` or the other packages imports it,
and it is not installed with the product. One module per target, each an atheris entry point
(``python -m fuzz.<target> [libFuzzer options] [corpus folders]``); ``python -m fuzz`` runs
them with the seed corpus of ``fuzz/corpus/<target>/`` (see ``fuzz/README.md``).

=================  ==========================================================================
target             what each input is
=================  ==========================================================================
``cstore``         bytes sent to a running listener after a valid A-ASSOCIATE negotiation:
                   raw PDUs, or the data set of a C-STORE framed as P-DATA-TF
``stow``           a STOW-RS request body (multipart/related), boundary from the input
``http_request``   the raw bytes of an HTTP request to the node's HTTP endpoint
``dicom_header``   a data set for the routing-header reader, and an instance for the preview
``hl7_ack``        the bytes a RIS answers an ORU^R01 with, over MLLP
``destination``    the text of ``D2R_DESTINATIONS``
=================  ==========================================================================
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CORPUS_DIR", "CRASHES_DIR", "FUZZ_DIR", "REGRESSIONS_DIR", "TARGETS"]

TARGETS = ("cstore", "stow", "http_request", "dicom_header", "hl7_ack", "destination")
FUZZ_DIR = Path(__file__).resolve().parent
#: the seed corpus, one folder per target (small, valid inputs; ``python -m fuzz seed``)
CORPUS_DIR = FUZZ_DIR / "corpus"
#: inputs that once failed a target and were fixed: replayed by the tests, one folder per target
REGRESSIONS_DIR = FUZZ_DIR / "regressions"
#: where a run writes the inputs that fail a target (crash-*, leak-*, oom-*, timeout-*)
CRASHES_DIR = FUZZ_DIR / "crashes"
