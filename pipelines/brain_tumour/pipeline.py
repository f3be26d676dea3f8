"""The brain tumour pipeline: a four-sequence MR study in, a BraTS SEG and a volumetric SR out.

BraTS style (Menze et al., IEEE TMI 2015; Baid et al. 2021, arXiv:2107.02314):

1. read each role's series (T1, T1c, T2, FLAIR) into a volume with its real
   geometry (:mod:`pipelines.brain_tumour.volume`);
2. reorient, co-register to T1c where the grids differ, resample to 1 mm,
   N4 (shrink 4) only where the model was trained on N4-corrected volumes
   (the card's ``volume_input.bias_field_correction``, or ``n4`` in the
   settings), skull-strip when needed, z-score per channel
   (:mod:`pipelines.brain_tumour.preprocess`);
3. a SegResNet with sliding-window inference (:mod:`pipelines.brain_tumour.model`):
   TC, WT, ET probabilities -> BraTS labels NCR (1), ED (2), ET (4);
4. labels mapped back onto the reference series' grid (T1c by default) with
   nearest-neighbour resampling, so the SEG lies on the images a radiologist
   scrolls;
5. a SEG with NCR, ED, ET and a TID 1500 SR with the ET, TC and WT volumes in
   ml (:mod:`pipelines.brain_tumour.write`).

Every step's wall time goes into the job's timings.
"""

from __future__ import annotations

import threading
import time

from pydicom import Dataset

from models.registry import ModelRegistry
from pipelines.base import PipelineContext, PipelineNotApplicable, Study
from pipelines.brain_tumour.model import BrainTumourModel
from pipelines.brain_tumour.preprocess import preprocess_study, to_reference
from pipelines.brain_tumour.settings import ROLES, BrainTumourSettings
from pipelines.brain_tumour.skull_strip import DeepbetExtractor
from pipelines.brain_tumour.volume import series_to_image
from pipelines.brain_tumour.write import PIPELINE, measure_volumes, write_seg, write_sr
from pipelines.common.identity import AlgorithmDescription


class _LazyBrainExtractor:
    """deepbet loaded on the first study that needs skull stripping, then kept
    (most BraTS-style inputs are already stripped: no need to load it)."""

    def __init__(self, device: str):
        self.device = device
        self._extractor: DeepbetExtractor | None = None
        self._lock = threading.Lock()
        self.name = "deepbet"

    def __call__(self, image):
        with self._lock:
            if self._extractor is None:
                self._extractor = DeepbetExtractor(self.device)
        return self._extractor(image)


class BrainTumourPipeline:
    """BraTS-style glioma segmentation of a T1/T1c/T2/FLAIR study.

    Parameters
    ----------
    settings:
        ``[pipelines.brain_tumour]``: model card, reference role, roi/overlap
        overrides, skull stripping, N4 on/off (empty: the card's) and shrink factor.
    registry:
        Where the model card and weights are found (loaded once, here).
    device:
        torch device string.

    Raises
    ------
    models.registry.ModelNotFoundError, models.registry.WeightsIntegrityError, ValueError
        The model cannot be loaded.
    """

    name = PIPELINE
    level = "study"

    def __init__(self, settings: BrainTumourSettings, registry: ModelRegistry, device: str = "cpu"):
        self.settings = settings
        self.device = device
        self.model = BrainTumourModel(registry, settings.model, device)
        self.extractor = _LazyBrainExtractor(device)
        # Preprocess as the model was trained: a mismatch changes the volumes
        # (TCGA-FG-6692 scanner series: WT 5.9 ml with N4, 15.4 ml without).
        self.n4 = self.model.bias_field_correction if settings.n4 is None else settings.n4
        params = {
            "reference": settings.reference_role,
            "skull_strip": settings.skull_strip,
            "n4": "on" if self.n4 else "off",
        }
        if self.n4:
            params["n4_shrink"] = str(settings.n4_shrink_factor)
        if settings.roi_size:
            params["roi"] = "x".join(map(str, settings.roi_size))
        if settings.overlap is not None:
            params["overlap"] = f"{settings.overlap:g}"
        self.algorithm = AlgorithmDescription(name=self.model.name, version=self.model.version, parameters=params)

    @property
    def model_version(self) -> str:
        return self.algorithm.label

    def run(self, study: Study, context: PipelineContext) -> list[Dataset]:
        """Segment the study and write its SEG and SR.

        Returns
        -------
        ``[SEG, SR]``.

        Raises
        ------
        PipelineNotApplicable
            A role's series is not MR (the message names the role and its
            Modality).
        PipelineInputError
            A role is missing, or a series' geometry or pixel data cannot be
            used (the message names the series and the attribute).
        """
        log, timings = context.log, context.timings
        sources = {role: study.role(role) for role in ROLES}  # names a missing role
        not_mr = {
            role: sorted({str(ds.get("Modality", "") or "absent") for ds in datasets} - {"MR"})
            for role, datasets in sources.items()
        }
        if any(not_mr.values()):
            raise PipelineNotApplicable(
                "the brain tumour model reads MR series; "
                + ", ".join(f"{role} is Modality {'/'.join(m)}" for role, m in not_mr.items() if m)
            )
        t = time.perf_counter()
        # volume.py raises PipelineInputError naming the series and attribute;
        # any other error is ours and keeps its traceback.
        volumes = {role: series_to_image(datasets) for role, datasets in sources.items()}
        timings["read_volumes"] = time.perf_counter() - t

        prep = preprocess_study(
            volumes,
            channel_order=self.model.channels,
            reference_role=self.settings.reference_role,
            n4=self.n4,
            n4_shrink_factor=self.settings.n4_shrink_factor,
            skull_strip=self.settings.skull_strip,
            brain_extractor=self.extractor,
            device=self.device,
            log=log,
        )
        timings.update({f"preprocess_{k}": v for k, v in prep.timings.items()})

        t = time.perf_counter()
        prediction = self.model.predict(
            prep.array,
            spacing_mm=prep.spacing_mm,
            roi=self.settings.roi_size,
            overlap=self.settings.overlap,
            precision=context.precision,
        )
        timings["inference"] = time.perf_counter() - t
        # Input drift (node.drift): the z-scored input over the whole field of view
        # (its zeros outside the brain included), and the whole-tumour volume in ml.
        context.observations.update(
            intensity_mean=float(prep.array.mean()), intensity_std=float(prep.array.std()),
            score=float(prediction.volumes_ml().get("WT", 0.0)),
        )

        t = time.perf_counter()
        reference = volumes[self.settings.reference_role]
        labels = to_reference(prediction.labels, prep, reference)
        if reference.is_multiframe:
            labels = reference.to_source_frames(labels)
        timings["map_to_reference"] = time.perf_counter() - t

        t = time.perf_counter()
        # Unusable source attributes raise PipelineInputError (pipelines.common.sanitize).
        seg, repairs = write_seg(
            list(reference.datasets), labels, sources=sources, algorithm=self.algorithm, context=context
        )
        sr, _ = write_sr(list(reference.datasets), seg, sources=sources, algorithm=self.algorithm, context=context)
        timings["write"] = time.perf_counter() - t
        for repair in repairs:
            log.info("source_value_repaired", repair=str(repair))
        log.info(
            "brain_tumour_result",
            model=self.model_version,
            volumes_ml=measure_volumes(list(reference.datasets), seg).as_log(),
            roles={role: datasets[0].SeriesInstanceUID for role, datasets in sources.items()},
        )
        return [seg, sr]
