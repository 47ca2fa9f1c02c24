"""Evaluation of generated reports (NLG, rule-based CE) and detections (mAP@0.5).

``evaluate_records(records, nlg_mode=...)`` is the library entry point; ``d2r evaluate`` wraps it.
"""

from training.evaluation.evaluate import evaluate_records, render_markdown, write_outputs
from training.evaluation.records import EvalRecord, LesionRecord, parse_records, read_records

__all__ = [
    "EvalRecord",
    "LesionRecord",
    "evaluate_records",
    "parse_records",
    "read_records",
    "render_markdown",
    "write_outputs",
]
