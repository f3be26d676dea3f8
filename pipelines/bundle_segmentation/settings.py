"""Settings of the generic MONAI-bundle segmentation pipeline, part of the node's one configuration object.

``[pipelines.bundle_segmentation]`` names the bundle, either by card
(``model``, written by ``ainode models import-bundle --pipeline
bundle_segmentation``) or by folder (``bundle``, registered in memory when the
pipeline starts, optionally with its ``sha256`` pinned), and may give the
SNOMED CT codes of its segments.

Segment codes (PS3.3 C.8.20.2, Segmented Property Category / Type; CID 7150
and CID 7151): each output label is looked up by its name (the bundle's
``metadata.json`` ``network_data_format.outputs.pred.channel_def``, compared
in lower case with ``_``/``-`` read as spaces), first in ``segment_codes``,
then in :data:`DEFAULT_ORGAN_CODES` (category SCT 91723000 "Anatomical
Structure", the type the organ's SCT code as pydicom tabulates it from
PS3.16). A name found in neither gets :data:`FALLBACK_CATEGORY` and
:data:`FALLBACK_TYPE`, SCT 85756007 "Tissue" for both: true of any segmented
region, and it claims no anatomy the bundle did not name.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "DEFAULT_ORGAN_CODES",
    "FALLBACK_CATEGORY",
    "FALLBACK_TYPE",
    "BundleSegmentationSettings",
    "CodeSetting",
    "SegmentCodeSetting",
    "normalise_name",
]

#: SCT 91723000, CID 7150: the category of every organ in :data:`DEFAULT_ORGAN_CODES`.
ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure
#: SCT 85756007 "Tissue" (CID 7150), category and type of a label no mapping names.
FALLBACK_CATEGORY = codes.SCT.Tissue
FALLBACK_TYPE = codes.SCT.Tissue

#: Organ name (as :func:`normalise_name` writes it) -> Segmented Property Type
#: (SCT, from pydicom's PS3.16 tables); category :data:`ANATOMICAL_STRUCTURE`.
DEFAULT_ORGAN_CODES: MappingProxyType[str, Code] = MappingProxyType(
    {
        "spleen": codes.SCT.Spleen,  # 78961009
        "liver": codes.SCT.Liver,  # 10200004
        "kidney": codes.SCT.Kidney,  # 64033007
        "left kidney": codes.SCT.Kidney,
        "right kidney": codes.SCT.Kidney,
        "pancreas": codes.SCT.Pancreas,  # 15776009
        "lung": codes.SCT.Lung,  # 39607008
        "heart": codes.SCT.Heart,  # 80891009
        "stomach": codes.SCT.Stomach,  # 69695003
        "gallbladder": codes.SCT.Gallbladder,  # 28231008
        "aorta": codes.SCT.Aorta,  # 15825003
        "esophagus": codes.SCT.Esophagus,  # 32849002
        "duodenum": codes.SCT.Duodenum,  # 38848004
        "colon": codes.SCT.Colon,  # 71854001
        "brain": codes.SCT.Brain,  # 12738006
        "prostate": codes.SCT.Prostate,  # 41216001
        "bone": codes.SCT.Bone,  # 272673000
        "vertebra": codes.SCT.Vertebra,  # 51282000
    }
)


def normalise_name(name: str) -> str:
    """Lower case, ``_`` and ``-`` as spaces, runs of spaces as one: ``"Left_Kidney"`` -> ``"left kidney"``."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", name)).strip().lower()


class CodeSetting(BaseModel):
    """One coded concept (PS3.3 8.8): ``value``, ``scheme`` (e.g. ``"SCT"``), ``meaning``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str = Field(min_length=1, max_length=16)
    scheme: str = Field("SCT", min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class SegmentCodeSetting(BaseModel):
    """Segmented Property Category (CID 7150) and Type (CID 7151) of one label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    category: CodeSetting
    type: CodeSetting


class BundleSegmentationSettings(BaseModel):
    """``[pipelines.bundle_segmentation]`` in the node configuration.

    Exactly one of ``model`` and ``bundle`` names the bundle when a route
    uses the pipeline; neither is needed when none does.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Card name written by `ainode models import-bundle --pipeline bundle_segmentation`."
    )
    bundle: Path | None = Field(
        None, description="MONAI bundle folder (configs/metadata.json, configs/inference.json, models/model.pt)."
    )
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$", description="With `bundle`: pinned SHA-256 of models/model.pt."
    )
    segment_codes: dict[str, SegmentCodeSetting] = Field(
        default_factory=dict, description="Label name -> SNOMED CT category and type; before the defaults."
    )

    @field_validator("segment_codes")
    @classmethod
    def _normalise(cls, v: dict[str, SegmentCodeSetting]) -> dict[str, SegmentCodeSetting]:
        return {normalise_name(k): c for k, c in v.items()}

    @model_validator(mode="after")
    def _one_source(self) -> BundleSegmentationSettings:
        if self.model is not None and self.bundle is not None:
            raise ValueError("give either model (a card name) or bundle (a folder), not both")
        if self.sha256 is not None and self.bundle is None:
            raise ValueError("sha256 pins a bundle folder: give bundle too (a card pins its own)")
        return self

    def segment_code(self, name: str) -> tuple[Code, Code]:
        """(category, type) of the label called ``name``: ``segment_codes``,
        then :data:`DEFAULT_ORGAN_CODES`, then "Tissue"/"Tissue"."""
        key = normalise_name(name)
        if key in self.segment_codes:
            setting = self.segment_codes[key]
            return setting.category.code(), setting.type.code()
        if key in DEFAULT_ORGAN_CODES:
            return ANATOMICAL_STRUCTURE, DEFAULT_ORGAN_CODES[key]
        return FALLBACK_CATEGORY, FALLBACK_TYPE
