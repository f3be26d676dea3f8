"""Registration of the brain tumour pipeline (:mod:`pipelines.registry` finds ``SPEC``)."""

from pipelines.brain_tumour.settings import ROLES, BrainTumourSettings
from pipelines.spec import Level, PipelineSpec

SPEC = PipelineSpec(
    name="brain_tumour",
    pipeline_class="pipelines.brain_tumour.pipeline:BrainTumourPipeline",
    settings=BrainTumourSettings,
    level=Level.STUDY,
    required_roles=ROLES,
    modalities=("MR",),
    description="Glioma segmentation (SegResNet, BraTS labels) of a T1/T1c/T2/FLAIR MR study: SEG and TID 1500 SR.",
)
