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
from typing import Any

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
        choices=("auto", "torch", "onnxruntime", "tensorrt"),
        help="inference backend (default: D2R_BACKEND, else auto: see docs/backends.md)",
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

    env = environment(args)  # the config file (--config, D2R_CONFIG) under the environment
    options = _options(args, env)
    if isinstance(options, int):
        return options
    max_pixel_bytes, model = options
    datasets = _read_images(args.files, max_pixel_bytes)
    if isinstance(datasets, int):
        return datasets
    predictor = _open(model)
    if isinstance(predictor, int):
        return predictor
    from model.errors import ModelError

    try:
        result = predictor.predict(datasets)
    except ModelError as e:
        return fail("predict", f"{args.files[0]}: {e}", EXIT_FAILURE)
    _print(result, datasets[0], as_json=args.json, backend=predictor.backend_choice.describe())
    return 0


def _options(args: argparse.Namespace, env: dict[str, str]) -> tuple[int, Any] | int:
    """The pixel-data limit and the model options from the settings under the flags, or the
    exit status of a usage error."""
    from d2r_core.errors import ConfigError
    from dicom_node.settings import MAX_PIXEL_BYTES, SPOOL_DIR
    from report.grounding import report_chooser
    from worker.predictor import ModelOptions
    from worker.settings import (
        BACKEND,
        BACKEND_CACHE_DIR,
        DEVICE,
        ENGINE_DIR,
        INPUT_GATE,
        MODEL,
        REPORT_CHOICE,
        default_backend_cache_dir,
        default_model_path,
    )

    model_dir = args.model or MODEL.read(env) or default_model_path()
    if not model_dir:
        return fail("predict", "no model: pass --model DIR or set D2R_MODEL", EXIT_USAGE)
    # D2R_BACKEND is checked by the backend factory, whose one-line error names the setting
    backend = args.backend or BACKEND.read(env, parse=str)
    backend_setting = "--backend" if args.backend else BACKEND.name
    engine_dir = args.engine_dir or ENGINE_DIR.read(env)
    engine_setting = (
        "--engine-dir" if args.engine_dir else ENGINE_DIR.name if engine_dir else "--engine-dir"
    )
    try:
        device = args.device or DEVICE.read(env)
        input_gate = INPUT_GATE.read(env)
        report_choice = REPORT_CHOICE.read(env)
        report_chooser(report_choice)  # an unknown choice fails here, before the model loads
        max_pixel_bytes = MAX_PIXEL_BYTES.read(env)
        cache_dir = BACKEND_CACHE_DIR.read(env) or default_backend_cache_dir(SPOOL_DIR.read(env))
    except ConfigError as e:
        return fail("predict", str(e), EXIT_USAGE)
    return max_pixel_bytes, ModelOptions(
        Path(model_dir),
        device=device,
        backend=backend,
        engine_dir=Path(engine_dir) if engine_dir else None,
        cache_dir=cache_dir,
        input_gate=input_gate,
        report_choice=report_choice,
        lesion_min_score=args.min_score,
        backend_setting=backend_setting,
        engine_setting=engine_setting,
    )


def _read_images(names: list[str], max_pixel_bytes: int) -> list[Any] | int:
    """The files as data sets (pixel data bounded), or the exit status naming a bad one."""
    from dicom_node.errors import InstanceRejected, PixelDataTooLarge
    from dicom_node.instance_file import read_instance

    datasets = []
    for name in names:
        path = Path(name)
        if not path.is_file():
            return fail("predict", f"{name}: no such file", EXIT_USAGE)
        try:
            datasets.append(read_instance(path, max_pixel_bytes=max_pixel_bytes))
        except PixelDataTooLarge as e:
            return fail("predict", f"{name}: {e}", EXIT_USAGE)
        except (InstanceRejected, OSError) as e:
            return fail("predict", f"{name}: not a readable DICOM file ({e})", EXIT_USAGE)
    return datasets


def _open(model: Any) -> Any:
    """The predictor (:func:`worker.predictor.open_predictor`), or the exit status of why not."""
    from model.backends import BackendError
    from model.errors import CheckpointError, GateMissingError
    from worker.predictor import open_predictor

    try:
        return open_predictor(model)
    except GateMissingError as e:
        return fail("predict", str(e), EXIT_FAILURE)
    except CheckpointError as e:
        return fail("predict", f"bad checkpoint {model.model_dir}: {e}", EXIT_FAILURE)
    except BackendError as e:
        return fail("predict", str(e), EXIT_USAGE)


def _print(result: Any, image: Any, *, as_json: bool, backend: str) -> None:
    """The report: one JSON object, or text for a person; ``backend`` is what ran it."""
    gate = {
        "input_gate": "on" if result.input_gate else "off",
        "abstained": result.abstained,
        "abstain_reason": result.abstain_reason or None,
        "ood_score": None if result.ood_score is None else round(result.ood_score, 3),
        "ood_threshold": None if result.ood_threshold is None else round(result.ood_threshold, 3),
    }
    model = {"name": result.model_name, "version": result.model_version, "backend": backend}
    if as_json and result.abstained:  # no lesions and no text
        answer = {**gate, "model": model, "sop_instance_uid": result.sop_instance_uid}
        print(json.dumps(answer, indent=1))
        return
    from report.grounding import ground

    grounding = ground(
        result.findings,
        result.impression,
        [(x.class_name, x.box) for x in result.lesions],
        int(image.get("Columns") or 1),
        int(image.get("Rows") or 1),
    )
    if as_json:
        answer = {**gate, **_grounded(result, grounding)}
        answer.update(model=model, sop_instance_uid=result.sop_instance_uid)
        print(json.dumps(answer, indent=1))
        return
    _print_text(result, grounding, backend)


def _grounded(result: Any, grounding: Any) -> dict[str, Any]:
    """The report's text, sentences and lesions, each lesion tied to its sentence."""
    return {
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
    }


def _print_text(result: Any, grounding: Any, backend: str) -> None:
    print(f"Model: {result.model_name} {result.model_version}")
    print(f"Backend: {backend}")
    print(f"Image: {result.sop_instance_uid}")
    if result.abstained:
        print(f"\nNOT ASSESSED: {result.abstain_reason}")
        return
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
