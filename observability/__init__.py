"""Observability of the node and the workers: Prometheus metrics (``metrics``), the audit log
(``audit``), JSON logs (``logs``), the HTTP endpoint with its authentication and route table
(``http``, ``auth``, ``routes``) and the status page (``status_page``, ``pages``).

It reads the study database's views and records; it never runs the model, the worker, a sender
or a listener (see the import-linter contracts).
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
