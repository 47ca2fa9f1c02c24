"""The D2R-Net worker: Celery tasks that turn a queued study into Structured Reports."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
