"""DICOM MR series -> a 3-D SimpleITK image with its real patient geometry.

The reader is shared with the other volumetric pipelines and lives in
:mod:`pipelines.common.volume`; this module keeps the brain pipeline's
import path.
"""

from __future__ import annotations

from pipelines.common.volume import SeriesVolume, SliceSource, series_to_image

__all__ = ["SliceSource", "SeriesVolume", "series_to_image"]
