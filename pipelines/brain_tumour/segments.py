"""Segments, regions and codes of the brain tumour SEG and SR.

The BraTS labels (1 NCR, 2 ED, 4 ET) as the SEG's three segments, the BraTS
evaluation regions (ET, TC, WT) the SR reports, and the volumes the SR
states (:class:`TumourVolumes`). Why these codes (PS3.16 CID 7150, 7159,
7168): :mod:`pipelines.brain_tumour.write`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "BRATS_LABELS",
    "REGIONS",
    "SEGMENTS",
    "TumourRegion",
    "TumourSegment",
    "TumourVolumes",
]

#: The values a BraTS label map may hold.
BRATS_LABELS = (0, 1, 2, 4)

MORPHOLOGICALLY_ABNORMAL = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003, CID 7150
NECROSIS = codes.SCT.Necrosis  # SCT 6574001, CID 7168
EDEMA = codes.SCT.Edema  # SCT 79654002, CID 7168
ENHANCING_LESION = codes.NCIt.EnhancingLesion  # NCIt C113842, CID 7168
NEOPLASM = codes.SCT.Neoplasm  # SCT 108369006, CID 7159
LESION = codes.SCT.Lesion  # SCT 52988006, CID 7159
BRAIN = codes.SCT.Brain  # SCT 12738006
PROCEDURE = codes.cid100.MultiparametricMRI  # DCM 126020, CID 100


@dataclass(frozen=True)
class TumourSegment:
    """One segment of the SEG: a BraTS label.

    Attributes
    ----------
    number:
        Segment Number (0062,0004).
    brats_label:
        The label-map value it holds.
    abbreviation:
        BraTS name: ``"NCR"``, ``"ED"`` or ``"ET"``.
    label:
        Segment Label (0062,0005).
    property_type:
        Segmented Property Type (CID 7168).
    rgb:
        Recommended display colour, 0-255 per channel (written as CIE L*a*b*).
    meaning:
        What the label covers, for the Segment Description.
    """

    number: int
    brats_label: int
    abbreviation: str
    label: str
    property_type: Code
    rgb: tuple[int, int, int]
    meaning: str


NCR = TumourSegment(
    1, 1, "NCR", "Necrotic tumour core (NCR)", NECROSIS, (255, 0, 0), "necrotic and non-enhancing tumour core"
)
ED = TumourSegment(2, 2, "ED", "Peritumoral oedema (ED)", EDEMA, (0, 255, 0), "peritumoral oedema")
ET = TumourSegment(3, 4, "ET", "Enhancing tumour (ET)", ENHANCING_LESION, (255, 255, 0), "Gd-enhancing tumour")
#: The segments of the SEG, in Segment Number order.
SEGMENTS = (NCR, ED, ET)


@dataclass(frozen=True)
class TumourRegion:
    """A BraTS evaluation region: one or more segments together.

    Attributes
    ----------
    abbreviation:
        ``"ET"``, ``"TC"`` or ``"WT"``.
    name:
        Tracking Identifier of its SR group.
    segments:
        The segments whose union it is.
    finding_type:
        Finding of its SR group.
    """

    abbreviation: str
    name: str
    segments: tuple[TumourSegment, ...]
    finding_type: Code


#: ET (label 4), TC (labels 1 + 4), WT (labels 1 + 2 + 4).
REGIONS = (
    TumourRegion("ET", "Enhancing tumour (ET)", (ET,), ENHANCING_LESION),
    TumourRegion("TC", "Tumour core (TC = NCR + ET)", (NCR, ET), NEOPLASM),
    TumourRegion("WT", "Whole tumour (WT = NCR + ED + ET)", (NCR, ED, ET), LESION),
)


@dataclass(frozen=True)
class TumourVolumes:
    """Volumes of the segments and regions, as the SR states them.

    Attributes
    ----------
    voxel_counts:
        Segment abbreviation (``"NCR"``, ``"ED"``, ``"ET"``) -> number of
        voxels the SEG holds for it.
    pixel_spacing:
        Pixel Spacing of the reference (between rows, between columns), mm.
    slice_spacing:
        Distance between the reference's slices measured from Image Position
        (Patient) along the normal, mm (not Slice Thickness, which may
        differ from it when slices overlap or have gaps).
    """

    voxel_counts: Mapping[str, int]
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "voxel_counts", MappingProxyType(dict(self.voxel_counts)))

    @property
    def voxel_volume_mm3(self) -> float:
        """Pixel Spacing (rows) x Pixel Spacing (columns) x slice spacing, mm^3."""
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing

    def count(self, abbreviation: str) -> int:
        """Voxels of a segment (NCR, ED, ET) or region (ET, TC, WT).

        Raises
        ------
        KeyError
            Not one of those names.
        """
        for region in REGIONS:
            if region.abbreviation == abbreviation:
                return sum(self.voxel_counts[segment.abbreviation] for segment in region.segments)
        return self.voxel_counts[abbreviation]

    def ml(self, abbreviation: str) -> float:
        """Volume in ml of a segment (NCR, ED, ET) or region (ET, TC, WT):
        voxel count x voxel volume (mm^3) / 1000."""
        return self.count(abbreviation) * self.voxel_volume_mm3 / 1000.0

    def as_log(self) -> dict[str, float]:
        """``{"NCR_ml": ..., "ED_ml": ..., "ET_ml": ..., "TC_ml": ..., "WT_ml": ...,
        "voxel_mm3": ...}`` for a structured log line."""
        names = [segment.abbreviation for segment in SEGMENTS] + [r.abbreviation for r in REGIONS[1:]]
        return {**{f"{name}_ml": self.ml(name) for name in names}, "voxel_mm3": self.voxel_volume_mm3}
