"""What a report task did to a study, and what a send attempt left of a delivery.

The values are the words the worker has always logged, counted in ``/metrics`` (``reported``,
``abstained``, ``failed``) and returned from its Celery tasks; the delivery states are the study
database's own.
"""

from __future__ import annotations

from enum import StrEnum

from studydb.records import DELIVERY_FAILED, DELIVERY_PENDING, DELIVERY_SENT

__all__ = ["Outcome", "SendOutcome"]


class Outcome(StrEnum):
    """What happened to one study of a ``d2r.report_study`` task."""

    #: SRs written, the study recorded as reported and handed to its destinations
    REPORTED = "reported"
    #: the model's input gate declined the study: an abstention SR was written instead
    ABSTAINED = "abstained"
    #: the study failed: bad input, the model refused it, or out of attempts
    FAILED = "failed"
    #: an unexpected error spent one attempt; the study is queued again
    RETRY = "retry"
    #: nothing done: claimed elsewhere, already reported, re-opened or out of attempts
    STALE = "stale"
    #: a study that joined a batch and whose outcome the database did not take: its claim expires
    UNRECORDED = "unrecorded"


class SendOutcome(StrEnum):
    """What one ``d2r.send_reports`` attempt left: the delivery's new state, or ``stale``."""

    SENT = DELIVERY_SENT
    #: the attempt failed and the delivery waits for its retry
    PENDING = DELIVERY_PENDING
    FAILED = DELIVERY_FAILED
    #: the delivery was gone when the attempt was recorded
    UNKNOWN = "unknown"
    #: nothing sent: the study has no results, or the delivery is no longer pending
    STALE = "stale"
