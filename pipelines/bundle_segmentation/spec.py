"""Registration of the bundle segmentation pipeline (:mod:`pipelines.registry` finds ``SPEC``)."""

from pipelines.bundle_segmentation.settings import BundleSegmentationSettings
from pipelines.spec import Level, PipelineSpec

SPEC = PipelineSpec(
    name="bundle_segmentation",
    pipeline_class="pipelines.bundle_segmentation.pipeline:BundleSegmentationPipeline",
    settings=BundleSegmentationSettings,
    level=Level.SERIES,
    modalities=("CT", "MR"),
    description="Any single-input MONAI segmentation bundle, run unchanged on one CT or MR series: SEG and TID 1500 SR.",
)
