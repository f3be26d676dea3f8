"""The bundle segmentation pipeline: one CT or MR series through any single-input MONAI bundle, a SEG and SR out.

1. the series is read into a volume with its DICOM geometry and the modality
   rescale applied (:func:`pipelines.common.volume.series_to_image`: Rescale
   Slope/Intercept, so CT is in Hounsfield units);
2. the bundle's own ``preprocessing``, network, ``inferer`` and
   ``postprocessing`` run on it in memory (:mod:`pipelines.bundle_segmentation.bundle`);
3. the label map goes back onto the series' own grid by nearest neighbour
   (:func:`pipelines.common.resample.labels_onto_grid`, as the brain pipeline
   does), from the affine the bundle's transforms left on it;
4. a SEG with one segment per output label, and a TID 1500 SR with each
   segment's volume in ml (:mod:`pipelines.bundle_segmentation.write`).
"""

from __future__ import annotations

import time

import numpy as np
from pydicom import Dataset

from models.bundle_import import bundle_registry
from models.registry import ModelRegistry
from pipelines.base import PipelineContext, PipelineNotApplicable, Study
from pipelines.bundle_segmentation.bundle import BundleModel
from pipelines.bundle_segmentation.settings import BundleSegmentationSettings
from pipelines.bundle_segmentation.write import PIPELINE, make_segments, segment_volumes_ml, write_seg, write_sr
from pipelines.common.identity import AlgorithmDescription
from pipelines.common.resample import LPS_TO_RAS, image_from_affine, labels_onto_grid
from pipelines.common.volume import SeriesVolume, series_to_image

__all__ = ["BundleSegmentationPipeline", "labels_on_source_grid"]


def labels_on_source_grid(labels, volume: SeriesVolume) -> np.ndarray:
    """The bundle's label map (MetaTensor ``(1, X, Y, Z)``, RAS affine) on
    ``volume``'s grid: ``(slices, Rows, Columns)`` uint8 in the volume's slice
    order, nearest neighbour, 0 outside the bundle's field of view."""
    array_zyx = labels.as_tensor()[0].numpy().astype(np.uint8).transpose(2, 1, 0)
    affine = LPS_TO_RAS @ labels.affine.double().numpy()
    return labels_onto_grid(image_from_affine(array_zyx, affine), volume.image)


class BundleSegmentationPipeline:
    """Any single-input MONAI segmentation bundle, run as its ``inference.json`` says.

    Parameters
    ----------
    settings:
        ``[pipelines.bundle_segmentation]``: the bundle (card ``model`` or
        folder ``bundle`` with optional ``sha256``) and segment codes.
    registry:
        Where a ``model`` card is found; a ``bundle`` folder gets its own
        in-memory card (:func:`models.bundle_import.bundle_registry`).
    device:
        torch device string.

    Raises
    ------
    ValueError
        The settings name no bundle; the bundle fails the checks of
        :func:`models.bundle_import.segmentation_bundle_card` or of
        :class:`~pipelines.bundle_segmentation.bundle.BundleModel`.
    models.registry.ModelNotFoundError, FileNotFoundError, models.registry.WeightsIntegrityError
        Unknown card, missing file, SHA-256 mismatch.
    """

    name = PIPELINE
    level = "series"

    def __init__(self, settings: BundleSegmentationSettings, registry: ModelRegistry, device: str = "cpu"):
        if settings.model is None and settings.bundle is None:
            raise ValueError("[pipelines.bundle_segmentation] names no bundle: set model (a card) or bundle (a folder)")
        self.settings = settings
        if settings.bundle is not None:
            registry, name = bundle_registry(settings.bundle, sha256=settings.sha256)
        else:
            name = str(settings.model)
        self.model = BundleModel(registry, name, device)
        self.segments = make_segments(self.model.labels, settings.segment_code)
        card = self.model.card
        self.algorithm = AlgorithmDescription(
            name=card.name, version=card.version, parameters={"weights_sha256": card.weights.sha256}
        )

    @property
    def model_version(self) -> str:
        return self.algorithm.label

    def run(self, study: Study, context: PipelineContext) -> list[Dataset]:
        """Segment each series of ``study`` (a series-level job holds one) and
        write its SEG and SR.

        Returns
        -------
        ``[SEG, SR]`` per series.

        Raises
        ------
        PipelineNotApplicable
            A series' Modality is not one the bundle reads (its metadata's
            ``inputs.image.modality``).
        PipelineInputError
            A series' geometry or pixel data cannot be used (the message
            names the series and the attribute).
        """
        log, timings = context.log, context.timings
        results: list[Dataset] = []
        for series_uid, datasets in study.series.items():
            modalities = sorted({str(ds.get("Modality", "") or "absent") for ds in datasets})
            if modalities != [m for m in modalities if m in self.model.modalities]:
                raise PipelineNotApplicable(
                    f"model {self.model.name} reads {'/'.join(self.model.modalities)}; series {series_uid} is "
                    f"Modality {'/'.join(modalities)}"
                )
            t = time.perf_counter()
            volume = series_to_image(datasets)  # PipelineInputError naming the attribute
            timings["read_volume"] = time.perf_counter() - t

            t = time.perf_counter()
            labels = self.model.predict(volume, precision=context.precision)
            timings["bundle"] = time.perf_counter() - t

            t = time.perf_counter()
            on_source = labels_on_source_grid(labels, volume)
            if volume.is_multiframe:
                on_source = volume.to_source_frames(on_source)
            timings["map_to_source"] = time.perf_counter() - t

            t = time.perf_counter()
            reference = list(volume.datasets)
            seg, repairs = write_seg(
                reference, on_source, segments=self.segments, algorithm=self.algorithm, context=context
            )
            sr, _ = write_sr(reference, seg, segments=self.segments, algorithm=self.algorithm, context=context)
            timings["write"] = time.perf_counter() - t
            for repair in repairs:
                log.info("source_value_repaired", repair=str(repair))
            volumes = segment_volumes_ml(reference, seg)
            log.info(
                "bundle_segmentation_result",
                model=self.model_version,
                series_uid=series_uid,
                volumes_ml={s.name: round(volumes[s.number], 3) for s in self.segments},
            )
            results += [seg, sr]
        return results
