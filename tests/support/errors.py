"""Exceptions raised by the test harnesses.

::

    HarnessError                 a real peer used by a test misbehaved
     +-- OrthancError            Orthanc did not start or a REST call failed
     +-- ViewerError             the OHIF page, its server or Chromium failed
          +-- ViewerTimeoutError  the page never reached an expected state
"""

from __future__ import annotations


class HarnessError(RuntimeError):
    """Base class of every harness failure."""


class OrthancError(HarnessError):
    """Orthanc failed to start, exited, or answered a REST call with an error."""


class ViewerError(HarnessError):
    """The viewer server, Chromium or the DevTools session failed."""


class ViewerTimeoutError(ViewerError):
    """The viewer page did not reach an expected state in time."""
