"""The study database: durable study state, the single source of truth for what still needs
doing.

A SQLite file by default, any SQLAlchemy PostgreSQL URL for several replicas. The broker only
carries messages; this database decides which studies are complete, queued, processing, sent,
failed or skipped, and the reconciler (:mod:`dicom_node.assembler`) re-queues whatever a restart
or a lost message left behind.

States of a study::

    receiving --quiet period / force timeout--> queued --claimed by a worker--> processing
    processing --SRs written--> sending --every destination acknowledged--> done
    receiving --nothing eligible--> skipped (reason recorded)
    processing / sending --error or retries exhausted--> failed (reason recorded; ``d2r retry``)
    processing --unexpected error, attempts left--> queued (``attempt-failed`` event)
    processing --claim expired (worker killed or hung)--> queued, or failed after the last attempt

Each claim counts one attempt of the study's current generation (``attempts``); a worker renews
its claim's short lease while it works, so the reconciler re-queues the study of a dead worker
within one lease. ``state_changed_at`` records when the study entered its state (``d2r status
--stuck``).

A study's ``generation`` increases each time it is queued. A job carries the generation it was
queued with, so a stale message (the study re-opened by a late instance, or already handled) is
recognised and dropped by :meth:`StudyStore.claim`.

Late instances: an instance arriving while the study is ``receiving`` or ``queued`` (not yet
claimed) joins it and restarts the quiet period. One arriving after a worker claimed the study
is stored and recorded with an event, but does not start a second, different report; ``d2r retry
--reprocess`` re-runs the study on purpose.

Completion: a receiving study is complete once no instance arrived for the quiet period, or once
the force timeout passed since its first instance, or -- the early rule -- a short grace period
after the association that brought its last instance was released while no other association
that brought an instance of it is still open (``open_associations``, ``released_at``; see
:meth:`StudyStore.open_association` and :meth:`StudyStore.close_association`). The counters live
in this database, so a node restarted between the release and the completion still completes the
study on time. An association cut by a crash of the node is never counted as released: its
studies fall back to the quiet period.

Several nodes (PostgreSQL): every node runs the same receivers and the same assembler on one
database. Each state change is a conditional update, so whichever node's update wins does the
work (queues the job, re-sends it, hands a delivery to the queue) and the others find nothing to
do. Each node records a heartbeat (``nodes``) and which of its associations are open for which
study (``node_associations``); a surviving node expires the open associations of a node that
stopped beating (:meth:`StudyStore.expire_silent_nodes`), so a study is never held by a dead
node. Duties that must run on one node at a time (retention, the spool check) take a short lease
(:meth:`StudyStore.hold_duty`).

Database outages: a restart or failover of the database raises connection errors. Every public
method retries them with a short backoff for ``retry_seconds`` (a transaction that failed was
rolled back, so running it again is safe), then raises
:class:`~studydb.errors.DatabaseUnavailable`. Callers that must answer quickly (the
receivers, the probes) narrow the budget with :meth:`StudyStore.retry_budget`.

Times are stored as UTC seconds since the epoch (floats), so SQLite and PostgreSQL behave the
same.

Modules, one per role: :mod:`studydb.engine` (engine, transactions, retries),
:mod:`studydb.schema` and :mod:`studydb.migrations` (revisions), :mod:`studydb.tables`,
:mod:`studydb.records` (states and records), :mod:`studydb.ingest` (what the receivers record),
:mod:`studydb.lifecycle` (completion, claims, leases, attempts), :mod:`studydb.deliveries`,
:mod:`studydb.views` (what status, the status page and the metrics read), and
:mod:`studydb.store`, whose :class:`~studydb.store.StudyStore` holds them all.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
