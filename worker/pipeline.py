"""The only place the stages meet: frontal image(s) -> D2R-Net -> Structured Reports.

Pure orchestration: every collaborator comes in as a parameter, nothing here touches the
broker, the database or the network.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.errors import InstanceRejected
from model.errors import ModelError, PreprocessError
from model.predict import StudyPrediction
from report.build import LesionFinding, ReportContent
from report.errors import SourceImageError
from report.grounding import ground
from worker.errors import InputRejected, PredictionError
from worker.messages import ReportJob
from worker.stages import Stage, StageTracker

logger = logging.getLogger(__name__)

#: what a spooled file that cannot be parsed raises; anything else is an unexpected error
UNREADABLE_INPUT = (
    InvalidDicomError,
    EOFError,
    FileNotFoundError,
    IsADirectoryError,
    ValueError,
    struct.error,
)

ReadImage = Callable[[str], Dataset]
Predict = Callable[[Sequence[Dataset]], StudyPrediction]
BuildReports = Callable[[ReportContent], list[Dataset]]


@dataclass(frozen=True)
class ReportResult:
    """The objects of one study (the SRs first, TID 1500 first; then the presentation state
    and the overlay image, as ``D2R_OUTPUTS`` chose), the prediction and what the SRs say
    (``content``: the grounded lesions and the checked impression)."""

    reports: list[Dataset]
    prediction: StudyPrediction
    content: ReportContent


#: said in every SR while ``D2R_INPUT_GATE`` is off
GATE_OFF_COMMENT = (
    "The input gate was off (D2R_INPUT_GATE=off): the image was not checked against the "
    "inputs the model was validated on."
)


def abstention_text(prediction: StudyPrediction) -> tuple[str, str]:
    """Findings and impression of an abstention SR: who declined the study, and why."""
    who = f"model {prediction.model_name} version {prediction.model_version}"
    score = (
        ""
        if prediction.ood_score is None or prediction.ood_threshold is None
        else f" (score {prediction.ood_score:.1f}, threshold {prediction.ood_threshold:.1f})"
    )
    return (
        f"Not assessed: this study was not assessed by the AI {who}. "
        f"Reason: {prediction.abstain_reason}{score}.",
        "Not assessed by AI: no AI findings for this study.",
    )


def report_content(prediction: StudyPrediction, images: Sequence[Dataset]) -> ReportContent:
    """Map a model prediction onto the report builder's input (an abstention: no lesion
    groups, and text saying that the model declined the study and why).

    The lesions are grounded in the findings (:func:`report.grounding.ground`): only boxes a
    findings sentence states become lesion groups, each carrying its sentence; the impression
    keeps only the sentences the findings support.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in images}
    try:
        image = by_uid[prediction.sop_instance_uid]
    except KeyError:
        raise PredictionError(
            f"prediction refers to {prediction.sop_instance_uid}, not one of the study's images"
        ) from None
    comments = () if prediction.input_gate else (GATE_OFF_COMMENT,)
    if prediction.abstained:
        findings, impression = abstention_text(prediction)
        why = prediction.abstain_reason or "no reason given"  # the presentation state says it
        return ReportContent(findings, impression, [], image, list(images), comments, why)
    grounding = ground(
        prediction.findings,
        prediction.impression,
        [(les.class_name, les.box) for les in prediction.lesions],
        int(image.Columns),
        int(image.Rows),
    )
    withheld = len(prediction.lesions) - len(grounding.reported)
    if withheld or grounding.dropped_impression:
        logger.info(
            "image %s: %d box(es) not stated by the findings withheld, %d impression "
            "sentence(s) the findings do not support left out",
            prediction.sop_instance_uid,
            withheld,
            len(grounding.dropped_impression),
        )
    return ReportContent(
        findings=prediction.findings,
        impression=grounding.impression,
        comments=comments,
        lesions=[
            LesionFinding(
                class_name=les.class_name,
                score=les.score,
                box=les.box,
                sentence=grounding.sentence_of(index),
            )
            for index, les in enumerate(prediction.lesions)
            if grounding.lesions[index].reported
        ],
        image=image,
        evidence=list(images),
    )


def run(
    job: ReportJob,
    *,
    read_image: ReadImage,
    predict: Predict,
    build_reports: BuildReports,
    stages: StageTracker | None = None,
    images: list[Dataset] | None = None,
) -> ReportResult:
    """Produce the SRs for ``job``.

    ``stages`` follows the attempt (``predict`` enters decode, preprocess and predict itself);
    ``images`` collects the headers read, so a failure reason can leave their identifiers out.

    Raises
    ------
    InputRejected
        An image cannot be parsed or decoded, or declares more pixel data than the reader
        allows (the input, not the worker, is at fault).
    PredictionError
        The model refused readable input.
    Exception
        Anything else is unexpected: the caller counts it as a failed attempt.
    """
    stages = StageTracker() if stages is None else stages
    images = [] if images is None else images
    stages.enter(Stage.SPOOL_READ)
    for inst in job.instances:
        try:
            images.append(read_image(inst.path))
        except InstanceRejected as exc:  # unparseable, or pixel data over D2R_MAX_PIXEL_BYTES
            raise InputRejected(f"cannot read instance {inst.sop_instance_uid}: {exc}") from exc
        except UNREADABLE_INPUT as exc:
            raise InputRejected(
                f"cannot read instance {inst.sop_instance_uid}: {type(exc).__name__}"
            ) from exc
    try:
        prediction = predict(images)
    except PreprocessError as exc:
        raise InputRejected(f"cannot decode the image: {exc}") from exc
    except ModelError as exc:
        raise PredictionError(f"model failed: {type(exc).__name__}: {exc}") from exc
    stages.enter(Stage.SR_BUILD)
    try:
        content = report_content(prediction, images)
        reports = build_reports(content)
    except SourceImageError as exc:  # the header cannot be referenced: retrying cannot help
        raise InputRejected(f"cannot reference the image in an SR: {exc}") from exc
    logger.info(
        "study %s: %d lesion(s) reported of %d detected, %d DICOM object(s)",
        job.study_instance_uid,
        len(content.lesions),
        len(prediction.lesions),
        len(reports),
    )
    return ReportResult(reports=reports, prediction=prediction, content=content)
