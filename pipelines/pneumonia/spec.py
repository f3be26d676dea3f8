"""Registration of the pneumonia pipeline (:mod:`pipelines.registry` finds ``SPEC``)."""

from pipelines.pneumonia.settings import PneumoniaSettings
from pipelines.spec import Level, PipelineSpec

SPEC = PipelineSpec(
    name="pneumonia",
    pipeline_class="pipelines.pneumonia.pipeline:PneumoniaPipeline",
    settings=PneumoniaSettings,
    level=Level.SERIES,
    modalities=("CR", "DX"),
    description="Chest radiograph pneumonia classifier (DenseNet-121) with a Grad-CAM SEG and a TID 1500 SR.",
)
