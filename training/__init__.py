"""Offline tools: the synthetic chest phantom, dataset adapters and evaluation.

Never imported by the runtime packages. Everything trained or scored on the phantom is
synthetic data, not for clinical use.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
