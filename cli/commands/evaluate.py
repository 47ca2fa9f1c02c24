"""``d2r evaluate``: score generated reports (NLG, rule-based CE) and lesion boxes (mAP@0.5).

Input: JSON Lines with ``id``, ``reference``, ``generated`` (+ ``gt_lesions``/``pred_lesions``),
or ``--model DIR --data DIR`` to run a checkpoint on a ``d2r synth`` output's DICOM files.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", metavar="FILE.jsonl", help="records to score")
    parser.add_argument(
        "--out",
        required=True,
        metavar="metrics.json",
        help="metrics file; metrics.md and per_report.jsonl go beside it",
    )
    parser.add_argument(
        "--nlg-mode",
        choices=("r2gen", "coco"),
        default="r2gen",
        help="text normalisation (default r2gen)",
    )
    parser.add_argument(
        "--r2gen-truncate-refs",
        type=int,
        default=None,
        metavar="N",
        help="cut references to N tokens, as R2Gen does with 99",
    )
    parser.add_argument("--model", metavar="DIR", help="checkpoint to run (with --data)")
    parser.add_argument("--data", metavar="DIR", help="a d2r synth output folder (with --model)")
    parser.add_argument(
        "--split",
        default="test",
        help="split of --data to score: train, val, test or all (default test)",
    )
    parser.add_argument(
        "--report-choice",
        choices=("consistent", "probable"),
        default=None,
        help="with --model: which of the beam's reports is scored, as D2R_REPORT_CHOICE on the "
        "node (default: environment D2R_REPORT_CHOICE, else consistent)",
    )


def _predict_records(
    model: str, data: str, split: str, choice: str, env: dict[str, str]
) -> list[Any]:
    from pathlib import Path

    from dicom_node.settings import SPOOL_DIR
    from training.evaluation.predictions import predict_phantom_records
    from worker.predictor import ModelOptions, open_predictor
    from worker.settings import BACKEND, BACKEND_CACHE_DIR, default_backend_cache_dir

    # the backend policy of the worker (D2R_BACKEND, default auto), so the figures are its own
    options = ModelOptions(
        Path(model),
        backend=BACKEND.read(env),
        cache_dir=BACKEND_CACHE_DIR.read(env) or default_backend_cache_dir(SPOOL_DIR.read(env)),
        report_choice=choice,
    )
    predictor = open_predictor(options)
    return predict_phantom_records(
        Path(model), Path(data), None if split == "all" else split, predictor=predictor
    )


def _report_choice(env: dict[str, str]) -> str:
    """``D2R_REPORT_CHOICE`` as the node reads it (unchecked: :func:`run` names a bad value)."""
    from worker.settings import REPORT_CHOICE

    return REPORT_CHOICE.read(env, parse=str)


# Longer than a screen: argument checks, the records, the metrics and the printed summary of one
# command, read top to bottom
def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from training.errors import TrainingError
    from training.evaluation import evaluate_records, read_records, write_outputs

    if bool(args.model) != bool(args.data):
        print("d2r evaluate: --model and --data go together", file=sys.stderr)
        return 2
    if bool(args.predictions) == bool(args.model):
        print("d2r evaluate: give either --predictions or --model/--data", file=sys.stderr)
        return 2
    from cli.runtime import environment

    env = environment(args)
    choice = args.report_choice or _report_choice(env)
    if choice not in ("consistent", "probable"):
        print("d2r evaluate: D2R_REPORT_CHOICE: expected consistent or probable", file=sys.stderr)
        return 2
    try:
        if args.predictions:
            records = read_records(Path(args.predictions))
        else:
            records = _predict_records(args.model, args.data, args.split, choice, env)
        metrics = evaluate_records(
            records,
            nlg_mode=args.nlg_mode,
            truncate_refs=args.r2gen_truncate_refs,
        )
        if args.model:
            metrics["meta"]["report_choice"] = choice
    except (TrainingError, OSError) as exc:
        print(f"d2r evaluate: {exc}", file=sys.stderr)
        return 1
    for path in write_outputs(metrics, Path(args.out)):
        print(path)
    keys = (
        "bleu_4",
        "meteor",
        "rouge_l",
        "cider",
        "ce_f1",
        "map50",
        "abstain_rate",
        "grounding_precision",
        "grounding_recall",
    )
    contradictions = metrics["contradictions"]
    print(
        " ".join(f"{k}={metrics[k]:.4f}" if metrics[k] is not None else f"{k}=n/a" for k in keys)
        + f" contradictions={'n/a' if contradictions is None else contradictions}"
    )
    return 0
