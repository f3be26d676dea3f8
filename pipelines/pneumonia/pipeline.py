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

Lateral views are skipped (the models are trained on frontal views); a series
with no usable frontal image fails with :class:`PipelineInputError`.
"""

from __future__ import annotations

import time

from pydicom import Dataset

from models.registry import ModelRegistry
from pipelines.base import PipelineContext, PipelineInputError, Study
from pipelines.common.derived import AlgorithmDescription
from pipelines.pneumonia.model import PneumoniaModel, cam_mask
from pipelines.pneumonia.settings import PneumoniaSettings
from pipelines.pneumonia.write import PIPELINE, write_seg, write_sr

#: View Position (0018,5101) values of lateral views (PS3.3 C.8.11.5, CID 4010 wording).
_LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}
_DEFAULT_THRESHOLD = 0.5


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
        return self.model.model_version

    def frontal_images(self, study: Study, log=None) -> list[Dataset]:
        """The study's single-frame CR/DX images that are not lateral views."""
        images = []
        for ds in study.datasets:
            modality = str(ds.get("Modality", "")).upper()
            view = str(ds.get("ViewPosition", "") or "").upper()
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            why = None
            if modality not in ("CR", "DX"):
                why = f"Modality {modality or 'absent'} is not CR or DX"
            elif "PixelData" not in ds:
                why = "no Pixel Data"
            elif frames != 1:
                why = f"{frames} frames; a radiograph has one"
            elif view in _LATERAL_VIEWS:
                why = f"lateral view ({view}); the model reads frontal views"
            if why:
                if log:
                    log.info("image_skipped", sop_instance_uid=ds.get("SOPInstanceUID"), reason=why)
                continue
            images.append(ds)
        return images

    def run(self, study: Study, context: PipelineContext) -> list[Dataset]:
        """Classify each frontal image and write its SEG and SR.

        Returns
        -------
        ``[SEG, SR]`` per frontal image, in the series' order.

        Raises
        ------
        PipelineInputError
            No frontal CR/DX image, or pixel data / attributes that cannot be
            used (the message says which and why).
        """
        log = context.log
        images = self.frontal_images(study, log)
        if not images:
            raise PipelineInputError("no frontal single-frame CR/DX image in the series")
        results: list[Dataset] = []
        timings = context.timings
        for ds in images:
            t = time.perf_counter()
            try:
                prediction = self.model.predict_dataset(ds, cam=True)
            except ValueError as exc:
                raise PipelineInputError(f"image {ds.SOPInstanceUID}: {exc}") from exc
            timings["inference"] = timings.get("inference", 0.0) + time.perf_counter() - t
            for note in prediction.notes:
                if log:
                    log.info("preprocessing", sop_instance_uid=ds.SOPInstanceUID, note=note)
            mask = cam_mask(prediction.cam, self.settings.cam_threshold)
            t = time.perf_counter()
            try:
                seg, repairs = write_seg(ds, mask, algorithm=self.algorithm, context=context)
                sr, _ = write_sr(
                    ds,
                    mask,
                    probability=prediction.probability,
                    threshold=self.threshold,
                    algorithm=self.algorithm,
                    context=context,
                )
            except ValueError as exc:
                raise PipelineInputError(f"image {ds.SOPInstanceUID}: cannot write results: {exc}") from exc
            timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t
            if log:
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
