"""Score records: NLG + CE + detection -> ``metrics.json``, ``metrics.md``, ``per_report.jsonl``."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from training.evaluation.ce import CE_COLUMN, CE_FOOTNOTE, compute_ce
from training.evaluation.detection import compute_detection
from training.evaluation.grounding import GroundingCase, compute_grounding
from training.evaluation.labeler import (
    CHEXPERT_OBSERVATIONS,
    PHRASES_COMMIT,
    label_reports,
    labeler_info,
)
from training.evaluation.nlg import compute_nlg
from training.evaluation.records import EvalRecord

logger = logging.getLogger(__name__)

MODULE_VERSION = "1.0"
NOT_COMPUTED = {
    "spice": "needs a CoreNLP 3.6.0 download on first use",
    "chexbert_f1": "model weights unavailable offline",
    "radgraph_f1": "model weights unavailable offline",
    "radcliq": "model weights unavailable offline",
    "bertscore": "model weights unavailable offline",
    "mirqi": "parser stack unavailable offline; code unlicensed",
}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _java_version() -> str | None:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    first = (out.stderr or out.stdout).strip().splitlines()
    return first[0] if first else None


def evaluate_records(
    records: Sequence[EvalRecord],
    *,
    nlg_mode: str = "r2gen",
    truncate_refs: int | None = None,
    nlg: bool = True,
) -> dict[str, Any]:
    """Score ``records`` (sorted by id first) and return the ``metrics.json`` object.

    The object also carries ``per_report`` (a list, written to ``per_report.jsonl`` by
    :func:`write_outputs`, not to ``metrics.json``). Studies the input gate declined count in
    ``abstain_rate``; every other metric is computed on the studies it accepted.
    """
    everything = sorted(records, key=lambda r: r.id)
    recs = [r for r in everything if not r.abstained]
    abstain_rate = (len(everything) - len(recs)) / len(everything) if everything else None
    ids = [r.id for r in recs]
    timings: dict[str, float] = {}
    metrics: dict[str, Any] = {
        k: None for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
    }
    per_nlg: dict[str, dict[str, float]] = {}
    if nlg and recs:
        result = compute_nlg(
            ids,
            [r.reference for r in recs],
            [r.generated for r in recs],
            mode=nlg_mode,
            truncate_refs=truncate_refs,
        )
        metrics.update(result.scores)
        per_nlg = result.per_report
        timings.update(result.timings)
    t = time.perf_counter()
    ref_labels = label_reports(r.reference for r in recs)
    gen_labels = label_reports(r.generated for r in recs)
    timings["labeler_s"] = time.perf_counter() - t
    ce = compute_ce(ref_labels, gen_labels)
    metrics["ce_precision"] = ce["pos_only"]["macro"]["precision"]
    metrics["ce_recall"] = ce["pos_only"]["macro"]["recall"]
    metrics["ce_f1"] = ce["pos_only"]["macro"]["f1"]
    with_boxes = [r for r in recs if r.gt_lesions is not None]
    detection: dict[str, Any] | None = None
    if with_boxes:
        t = time.perf_counter()
        gt = {r.id: [(le.class_name, le.box) for le in r.gt_lesions or ()] for r in with_boxes}
        pred = {
            r.id: [(le.class_name, le.score, le.box) for le in r.pred_lesions or ()]
            for r in with_boxes
        }
        detection = compute_detection(gt, pred)
        timings["detection_s"] = time.perf_counter() - t
    metrics["map50"] = detection["map50"] if detection else None
    metrics["abstain_rate"] = abstain_rate
    cases = [
        GroundingCase(
            r.generated,
            tuple((le.class_name, le.box) for le in r.pred_lesions or ()),
            tuple((le.class_name, le.box) for le in r.gt_lesions or ()),
            r.gt_sentences,
            *r.image_size,
        )
        for r in recs
        if r.gt_sentences is not None and r.image_size is not None and r.gt_lesions is not None
    ]
    grounding = compute_grounding(cases) if cases else None
    for key in ("grounding_precision", "grounding_recall", "contradictions"):
        metrics[key] = grounding[key] if grounding else None
    meta = {
        "n": len(recs),
        "n_abstained": len(everything) - len(recs),
        "n_with_boxes": len(with_boxes),
        "nlg_mode": nlg_mode,
        "r2gen_truncate_refs": truncate_refs,
        "unk_mapping": False,
        "versions": {
            "module": MODULE_VERSION,
            "pycocoevalcap": _version("pycocoevalcap"),
            "sacrebleu": _version("sacrebleu"),
            "scikit-learn": _version("scikit-learn"),
            "java": _java_version() if nlg else None,
            "python": platform.python_version(),
            "phrase_list_commit": PHRASES_COMMIT,
        },
        "labeler": {**labeler_info(), "column": CE_COLUMN},
        "example_based_empty_rule": "both sides empty -> P = R = F1 = 1",
        "detection_iou_threshold": 0.5,
        "runtime_s": timings,
    }
    per_report = []
    for rec, rl, gl in zip(recs, ref_labels, gen_labels, strict=True):
        row: dict[str, Any] = {
            "id": rec.id,
            **per_nlg.get(rec.id, {}),
            "sentence_bleu_4_note": "sentence-level, not comparable with corpus BLEU",
            # labels keyed by observation name (CheXpert order): 1, 0, -1 or null (unmentioned)
            "ce_reference": {o: rl[o] for o in CHEXPERT_OBSERVATIONS},
            "ce_generated": {o: gl[o] for o in CHEXPERT_OBSERVATIONS},
        }
        per_report.append(row)
    return {
        **metrics,
        "ce": ce,
        "detection": detection,
        "grounding": grounding,
        "meta": meta,
        "not_computed": NOT_COMPUTED,
        "per_report": per_report,
    }


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def render_markdown(m: dict[str, Any]) -> str:
    """The human-readable ``metrics.md`` (3 decimals)."""
    lines = [
        f"# Evaluation ({m['meta']['n']} reports, NLG mode `{m['meta']['nlg_mode']}`)",
        "",
        "| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr |",
        "|---|---|---|---|---|---|---|",
        "| "
        + " | ".join(
            _f(m[k]) for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
        )
        + " |",
        "",
        f"| {CE_COLUMN} | P | R | F1 |",
        "|---|---|---|---|",
    ]
    ce = m["ce"]
    for key in ("pos_only", "unc_as_pos"):
        for avg in ("macro", "micro"):
            s = ce[key][avg]
            lines.append(
                f"| {key} {avg} | {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['f1'])} |"
            )
    s = ce["example_based"]
    lines.append(f"| example_based | {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['f1'])} |")
    lines += ["", "| Observation (pos_only) | support | P | R | F1 |", "|---|---|---|---|---|"]
    for obs, s in ce["per_label"].items():
        lines.append(
            f"| {obs} | {s['support']} | {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['f1'])} |"
        )
    lines += ["", f"> {CE_FOOTNOTE}", ""]
    det = m["detection"]
    if det:
        lines += [
            f"Detection mAP@0.5: {_f(det['map50'])}",
            "",
            "| Class | AP@0.5 | GT boxes | predictions |",
            "|---|---|---|---|",
        ]
        for c, s in det["per_class"].items():
            if s["n_gt"] or s["n_pred"]:
                lines.append(f"| {c} | {_f(s['ap'])} | {s['n_gt']} | {s['n_pred']} |")
        lines.append("")
    gr = m.get("grounding")
    if gr:
        lines += [
            f"Grounding ({gr['counts']['studies']} studies with true sentence boxes, IoU >= "
            f"{gr['iou_threshold']}): precision {_f(gr['grounding_precision'])}, recall "
            f"{_f(gr['grounding_recall'])}, contradictions {gr['contradictions']}",
            "",
        ]
    lines.append("Not computed: " + ", ".join(sorted(m["not_computed"])) + ".")
    return "\n".join(lines) + "\n"


def write_outputs(metrics: dict[str, Any], out: Path) -> list[Path]:
    """Write ``out`` (metrics.json), ``metrics.md`` and ``per_report.jsonl`` beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in metrics.items() if k != "per_report"}
    out.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")
    md = out.with_name("metrics.md")
    md.write_text(render_markdown(metrics))
    per = out.with_name("per_report.jsonl")
    per.write_text("".join(json.dumps(r) + "\n" for r in metrics.get("per_report", [])))
    return [out, md, per]


__all__ = ["NOT_COMPUTED", "evaluate_records", "render_markdown", "write_outputs"]
