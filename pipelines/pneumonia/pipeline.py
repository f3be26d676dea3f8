"""The pneumonia pipeline: a chest radiograph series in, a SEG and an SR per image out.

RSNA Pneumonia Detection Challenge style (Shih et al., Radiology: AI 2019):
a DenseNet-121 classifier (Huang et al., CVPR 2017) on a windowed,
histogram-equalised frontal radiograph gives the probability of pneumonia;
Grad-CAM (Selvaraju et al., ICCV 2017) of that output, thresholded, gives the
image region that drove the decision.

For each frontal CR/DX image of the series the pipeline returns:

- a SEG with one segment, "Pneumonia model attention (Grad-CAM)", on the
  source's pixel grid;
- a TID 1500 SR with one TID 1410 group: the outline of the attention region
  on the source image, holding the probability, the operating threshold and
  the finding Pneumonia present/absent.

Colour and multi-frame images, localizers and objects that are not CR/DX
images (a SEG or SR a broad rule routed) are skipped; a series with nothing
else ends with :class:`PipelineNotApplicable`. A lateral view is the model
card's business when the card has a rule over View Position (0018,5101)
(the demo card's ``frontal_view``): refused by the node's intended-use guard
(``out_of_scope``) before the pipeline runs, or let through with a warning
that :attr:`PipelineContext.intended_use_warnings` names, and then read like
a frontal one, the SR and SEG saying OUT OF INTENDED USE. Otherwise (no such
rule, or no guard, as in ``ainode run``) it is skipped as before, never
processed silently. A series with no
usable image and a faulty one (no or empty Pixel Data) fails with
:class:`PipelineInputError`.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from pydicom import Dataset

from models.registry import ModelRegistry
from pipelines.base import PipelineContext, PipelineInputError, PipelineNotApplicable, Study
from pipelines.common.identity import AlgorithmDescription
from pipelines.pneumonia.model import PneumoniaModel, cam_mask
from pipelines.pneumonia.preprocess import dicom_to_image
from pipelines.pneumonia.settings import PneumoniaSettings
from pipelines.pneumonia.write import PIPELINE, write_seg, write_sr

#: View Position (0018,5101) values of lateral views (PS3.3 C.8.11.5, CID 4010 wording).
_LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}
_DEFAULT_THRESHOLD = 0.5
#: The logger of calls made without a context (PipelineContext's default).
_LOG = structlog.get_logger("pipelines")


def _unusable(ds: Dataset, lateral_warned: bool = False) -> tuple[type[Exception], str] | None:
    """Why the model does not read ``ds`` (see :meth:`PneumoniaPipeline.select_images`),
    or None. What the header says about a valid image comes first, so a
    lateral view without pixels is "not applicable", not "faulty".
    ``lateral_warned``: the guard let a lateral view through with a warning."""
    modality = str(ds.get("Modality", "")).upper()
    if modality not in ("CR", "DX"):
        return PipelineNotApplicable, f"Modality {modality or 'absent'} is not CR or DX"
    image_type = ds.get("ImageType") or []
    if "LOCALIZER" in [str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)]:
        return PipelineNotApplicable, "a localizer (Image Type LOCALIZER)"
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples != 1 or (photometric and not photometric.startswith("MONOCHROME")):
        return PipelineNotApplicable, (
            f"colour image (Samples per Pixel {samples}, Photometric Interpretation {photometric or 'absent'}); "
            "the model reads grey-scale radiographs"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        return PipelineNotApplicable, f"{frames} frames; a radiograph has one"
    view = str(ds.get("ViewPosition", "") or "").upper()
    if view in _LATERAL_VIEWS and not lateral_warned:
        return PipelineNotApplicable, f"lateral view (View Position {view}); the model reads frontal views"
    if "PixelData" not in ds:
        return PipelineInputError, "Pixel Data (7FE0,0010) is absent"
    if not ds.PixelData:
        return PipelineInputError, "Pixel Data (7FE0,0010) is empty (zero length)"
    return None


class PneumoniaPipeline:
    """Pneumonia classification with a Grad-CAM SEG.

    Parameters
    ----------
    settings:
        ``[pipelines.pneumonia]``: model card name, threshold, CAM threshold.
    registry:
        Where the model card and weights are found (loaded once, here).
    device:
        torch device string.

    Raises
    ------
    models.registry.ModelNotFoundError, models.registry.WeightsIntegrityError, ValueError
        The model cannot be loaded (unknown card, weights whose SHA-256 does
        not match the card, wrong task).
    """

    name = PIPELINE
    level = "series"

    def __init__(self, settings: PneumoniaSettings, registry: ModelRegistry, device: str = "cpu"):
        self.settings = settings
        self.model = PneumoniaModel(registry, settings.model, device)
        card = self.model.card
        #: The card's intended-use rules over View Position: the guard's to decide on a lateral view.
        self.view_rules = frozenset(r.name for r in card.intended_use_rules if "ViewPosition" in r.match)
        self.threshold = (
            settings.threshold if settings.threshold is not None else (self.model.threshold or _DEFAULT_THRESHOLD)
        )
        self.algorithm = AlgorithmDescription(
            name=card.name,
            version=card.version,
            parameters={"threshold": f"{self.threshold:.4f}", "cam_threshold": f"{settings.cam_threshold:g}"},
        )

    @property
    def model_version(self) -> str:
        return self.algorithm.label

    def frontal_images(self, study: Study, log: Any = _LOG) -> list[Dataset]:
        """The study's single-frame grey-scale CR/DX images that are not lateral views."""
        return self.select_images(study, log)[0]

    def select_images(
        self, study: Study, log: Any = _LOG, warnings: tuple[str, ...] = ()
    ) -> tuple[list[Dataset], list[tuple[type[Exception], str]]]:
        """Split the study into images this model reads and the others.

        ``warnings``: :attr:`PipelineContext.intended_use_warnings`; a lateral
        view is read when one of them names a View Position rule of the card.

        Returns
        -------
        images, skipped:
            The usable images, and for each other one the exception class
            that says why (:class:`PipelineNotApplicable` for a valid image
            that is not a frontal grey-scale radiograph,
            :class:`PipelineInputError` for a faulty one) and the reason.
        """
        images: list[Dataset] = []
        skipped: list[tuple[type[Exception], str]] = []
        warned = {w.split(" ", 1)[0] for w in warnings}  # each warning starts with its rule's name
        for ds in study.datasets:
            why = _unusable(ds, lateral_warned=bool(self.view_rules & warned))
            if why is None:
                images.append(ds)
                continue
            log.info("image_skipped", sop_instance_uid=ds.get("SOPInstanceUID"), reason=why[1])
            skipped.append(why)
        return images, skipped

    def run(self, study: Study, context: PipelineContext) -> list[Dataset]:
        """Classify each frontal image and write its SEG and SR.

        Returns
        -------
        ``[SEG, SR]`` per frontal image (and lateral view the guard let
        through with a warning), in the series' order.

        Raises
        ------
        PipelineNotApplicable
            No image of the series is a frontal single-frame grey-scale CR/DX
            radiograph, and none is faulty (the message says what they are).
        PipelineInputError
            No usable image and at least one faulty one, or pixel data /
            attributes of a frontal image that cannot be used (the message
            names the image and the attribute).
        """
        log = context.log
        images, skipped = self.select_images(study, log, context.intended_use_warnings)
        if not images:
            faults = [why for kind, why in skipped if kind is PipelineInputError]
            reasons = "; ".join(dict.fromkeys(faults or [why for _, why in skipped]))
            kind = PipelineInputError if faults else PipelineNotApplicable
            raise kind(f"no frontal single-frame CR/DX image in the series: {reasons}")
        results: list[Dataset] = []
        timings = context.timings
        for ds in images:
            t = time.perf_counter()
            try:  # only the reading of the input is an input fault; the model's errors keep their traceback
                source = dicom_to_image(ds)
            except ValueError as exc:
                raise PipelineInputError(f"image {ds.SOPInstanceUID}: {exc}") from exc
            prediction = self.model.predict(source, cam=True, precision=context.precision)
            assert prediction.cam is not None  # asked for
            timings["inference"] = timings.get("inference", 0.0) + time.perf_counter() - t
            if not context.observations:  # input drift (node.drift): one sample per job, its first image
                context.observations.update(intensity_mean=prediction.input_mean, intensity_std=prediction.input_std,
                                            score=prediction.probability)
            for note in prediction.notes:
                log.info("preprocessing", sop_instance_uid=ds.SOPInstanceUID, note=note)
            mask = cam_mask(prediction.cam, self.settings.cam_threshold)
            t = time.perf_counter()
            # Source attributes the writers cannot use raise PipelineInputError
            # (pipelines.common.sanitize); any other error is ours and keeps its traceback.
            seg, repairs = write_seg(ds, mask, algorithm=self.algorithm, context=context)
            sr, _ = write_sr(
                ds,
                mask,
                probability=prediction.probability,
                threshold=self.threshold,
                algorithm=self.algorithm,
                context=context,
            )
            timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t
            for repair in repairs:  # SEG and SR share the same repairs
                log.info("source_value_repaired", sop_instance_uid=ds.SOPInstanceUID, repair=str(repair))
            log.info(
                "pneumonia_result",
                sop_instance_uid=ds.SOPInstanceUID,
                probability=round(prediction.probability, 4),
                threshold=self.threshold,
                present=prediction.probability >= self.threshold,
                attention_pixels=int(mask.sum()),
                model=self.model_version,
            )
            results += [seg, sr]
        return results
