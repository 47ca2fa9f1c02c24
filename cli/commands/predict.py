"""``d2r predict``: run D2R-Net on DICOM files and print the report and lesions.

The model, backend, engine directory, device, input gate, report choice and pixel-data limit
are the worker's settings (``D2R_MODEL``, ``D2R_BACKEND``, ...), read from the configuration
file of ``--config`` under the environment as every command reads them; the command's flags
override them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.offline import EXIT_FAILURE, EXIT_USAGE, fail


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE.dcm",
        help="frontal image(s) of one study; lesions refer to the first",
    )
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="checkpoint directory (default: D2R_MODEL, else the bundled demo model)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--device", default=None, help="torch device (default: D2R_DEVICE, else cpu)"
    )
    parser.add_argument(
        "--backend",
        default=None,
        choices=("torch", "onnxruntime", "tensorrt"),
        help="inference backend (default: D2R_BACKEND, else torch)",
    )
    parser.add_argument(
        "--engine-dir",
        metavar="DIR",
        default=None,
        help="ONNX export (onnxruntime) or engine (tensorrt) directory (default: D2R_ENGINE_DIR)",
    )
    parser.add_argument(
        "--min-score",
        type=float,
        default=None,
        metavar="P",
        help="lesion score threshold (default: the checkpoint's)",
    )


def run(args: argparse.Namespace) -> int:
    from cli.runtime import environment
    from d2r_core.errors import ConfigError
    from dicom_node.settings import MAX_PIXEL_BYTES
    from worker.settings import BACKEND, DEVICE, ENGINE_DIR, INPUT_GATE, MODEL, REPORT_CHOICE

    env = environment(args)  # the config file (--config, D2R_CONFIG) under the environment
    model_dir = args.model or MODEL.read(env)
    if not model_dir:
        return fail("predict", "no model: pass --model DIR or set D2R_MODEL", EXIT_USAGE)
    from dicom_node.errors import InstanceRejected, PixelDataTooLarge
    from dicom_node.instance_file import read_instance

    # D2R_BACKEND is checked by the backend factory, whose one-line error names the setting
    backend = args.backend or BACKEND.read(env, parse=str)
    backend_setting = "--backend" if args.backend else BACKEND.name
    engine_dir = args.engine_dir or ENGINE_DIR.read(env)
    engine_setting = (
        "--engine-dir" if args.engine_dir else ENGINE_DIR.name if engine_dir else "--engine-dir"
    )
    from report.grounding import report_chooser

    try:
        device = args.device or DEVICE.read(env)
        input_gate = INPUT_GATE.read(env)
        choose_report = report_chooser(REPORT_CHOICE.read(env))
        max_pixel_bytes = MAX_PIXEL_BYTES.read(env)
    except ConfigError as e:
        return fail("predict", str(e), EXIT_USAGE)
    from model.backends import BackendError
    from model.errors import CheckpointError, GateMissingError, ModelError
    from model.predict import Predictor

    datasets = []
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            return fail("predict", f"{name}: no such file", EXIT_USAGE)
        try:
            datasets.append(read_instance(path, max_pixel_bytes=max_pixel_bytes))
        except PixelDataTooLarge as e:
            return fail("predict", f"{name}: {e}", EXIT_USAGE)
        except (InstanceRejected, OSError) as e:
            return fail("predict", f"{name}: not a readable DICOM file ({e})", EXIT_USAGE)
    try:
        predictor = Predictor.from_checkpoint(
            Path(model_dir),
            device=device,
            lesion_score_threshold=args.min_score,
            backend=backend,
            engine_dir=Path(engine_dir) if engine_dir else None,
            setting=backend_setting,
            engine_setting=engine_setting,
            input_gate=input_gate,
            choose_report=choose_report,
        )
    except GateMissingError as e:
        return fail("predict", str(e), EXIT_FAILURE)
    except CheckpointError as e:
        return fail("predict", f"bad checkpoint {model_dir}: {e}", EXIT_FAILURE)
    except BackendError as e:
        return fail("predict", str(e), EXIT_USAGE)
    try:
        result = predictor.predict(datasets)
    except ModelError as e:
        return fail("predict", f"{args.files[0]}: {e}", EXIT_FAILURE)
    gate = {
        "input_gate": "on" if result.input_gate else "off",
        "abstained": result.abstained,
        "abstain_reason": result.abstain_reason or None,
        "ood_score": None if result.ood_score is None else round(result.ood_score, 3),
        "ood_threshold": None if result.ood_threshold is None else round(result.ood_threshold, 3),
    }
    if args.json and result.abstained:  # no lesions and no text
        print(
            json.dumps(
                {
                    **gate,
                    "model": {"name": result.model_name, "version": result.model_version},
                    "sop_instance_uid": result.sop_instance_uid,
                },
                indent=1,
            )
        )
        return 0
    from report.grounding import ground

    image = datasets[0]
    grounding = ground(
        result.findings,
        result.impression,
        [(x.class_name, x.box) for x in result.lesions],
        int(image.get("Columns") or 1),
        int(image.get("Rows") or 1),
    )
    if args.json:
        print(
            json.dumps(
                {
                    **gate,
                    "findings": result.findings,
                    "impression": grounding.impression,
                    "impression_dropped": list(grounding.dropped_impression),
                    "sentences": [
                        {
                            "section": s.section,
                            "text": s.text,
                            "lesions": list(s.lesions),
                            "localised": s.localised,
                            "grounded": s.grounded,
                            "supported": s.supported,
                        }
                        for s in grounding.sentences
                    ],
                    "lesions": [
                        {
                            "class_name": x.class_name,
                            "score": round(x.score, 4),
                            "box": [round(v, 2) for v in x.box],
                            "status": g.status,
                            "sentence": g.sentence,
                        }
                        for x, g in zip(result.lesions, grounding.lesions, strict=True)
                    ],
                    "model": {"name": result.model_name, "version": result.model_version},
                    "sop_instance_uid": result.sop_instance_uid,
                },
                indent=1,
            )
        )
        return 0
    print(f"Model: {result.model_name} {result.model_version}")
    print(f"Image: {result.sop_instance_uid}")
    if result.abstained:
        print(f"\nNOT ASSESSED: {result.abstain_reason}")
        return 0
    if not result.input_gate:
        print("Input gate: off (the image was not checked against the model's inputs)")
    print(f"\nFINDINGS: {result.findings}\n\nIMPRESSION: {grounding.impression}\n")
    for dropped in grounding.dropped_impression:
        print(f"Impression sentence left out (the findings do not support it): {dropped}")
    print(f"Lesions ({len(result.lesions)}):")
    for x, g in zip(result.lesions, grounding.lesions, strict=True):
        box = ", ".join(f"{v:.1f}" for v in x.box)
        where = f"sentence {g.sentence + 1}" if g.sentence is not None else g.status
        print(f"  {x.class_name:<20} {x.score:.3f}  [{box}]  {where}")
    return 0
