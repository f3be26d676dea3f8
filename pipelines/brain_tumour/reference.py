"""The input-drift reference of a brain tumour model from BraTS-style NIfTI
case folders (the training data's form), each case read as the training
command reads it (:func:`~pipelines.brain_tumour.train_data.load_case`:
SimpleITK, LPS, each channel z-scored over its non-zero voxels, the
pipeline's own step) and segmented by :meth:`BrainTumourModel.predict` as
the pipeline runs it. See :mod:`models.drift_reference`; one case is one
study.

Per case:

- intensity mean and standard deviation of the z-scored four-channel input
  over the whole field of view (its zeros outside the brain included), and
  the score, the predicted whole-tumour volume in ml: what
  :class:`~pipelines.brain_tumour.pipeline.BrainTumourPipeline` reports;
- Pixel Spacing: the grid's anterior-posterior voxel size in mm (an axial
  image's row spacing, PS3.3 10.7.1.3), from the NIfTI header;
- Slice Thickness: the grid's inferior-superior voxel size in mm. NIfTI
  stores the slice spacing, not the thickness; the two are taken as equal,
  as :mod:`pipelines.brain_tumour.convert` writes them;
- Photometric Interpretation MONOCHROME2: MR intensities grow with the
  signal, and the minimum is shown black (PS3.3 C.7.6.3.1.2).

Left out, so that the node does not compare them: Manufacturer and Patient's
Age (NIfTI carries neither), View Position (not an MR attribute) and Bits
Stored (a NIfTI data type such as int16 is storage, not the bits the
modality stored).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from models.drift_reference import DriftFeature, DriftReference, build_reference
from pipelines.brain_tumour.model import BrainTumourModel
from pipelines.brain_tumour.train_data import BratsCase, find_brats_cases, load_case

__all__ = ["case_sample", "cases_reference", "nifti_reference"]


def case_sample(model: BrainTumourModel, case: BratsCase) -> dict[DriftFeature, str | float]:
    """The drift features of one case (module docstring).

    Raises
    ------
    ValueError
        The sequences do not share one grid, or a volume cannot be used
        (:func:`load_case`, :meth:`BrainTumourModel.predict`; the message names the case).
    """
    image, _, spacing = load_case(case, model.channels)  # spacing (D, H, W) = (S-I, A-P, R-L) in mm
    wt_ml = model.predict(image, spacing_mm=spacing).volumes_ml().get("WT", 0.0)
    return {
        DriftFeature.PHOTOMETRIC_INTERPRETATION: "MONOCHROME2",
        DriftFeature.PIXEL_SPACING: float(spacing[1]),
        DriftFeature.SLICE_THICKNESS: float(spacing[0]),
        DriftFeature.INTENSITY_MEAN: float(image.mean()),
        DriftFeature.INTENSITY_STD: float(image.std()),
        DriftFeature.SCORE: float(wt_ml),
    }


def cases_reference(model: BrainTumourModel, cases: Sequence[BratsCase], source: str) -> DriftReference:
    """The reference of ``cases``, one sample each (:func:`case_sample`).

    Raises
    ------
    ValueError
        ``cases`` is empty, or a case cannot be read.
    """
    return build_reference([case_sample(model, c) for c in cases], source)


def nifti_reference(model: BrainTumourModel, data_dir: Path, *, source: str = "") -> DriftReference:
    """The reference of every BraTS-style case under ``data_dir`` (a case
    folder or a folder of them, :func:`find_brats_cases`), labelled or not.

    Raises
    ------
    FileNotFoundError
        No case folder with the four sequences.
    ValueError
        A case cannot be read (the message names it).
    """
    cases = find_brats_cases(Path(data_dir))
    ids, folder = [c.case_id for c in cases], Path(data_dir).name
    what = f"{len(cases)} BraTS-style NIfTI case(s) of {folder}" + ("" if ids == [folder] else f" ({', '.join(ids)})")
    return cases_reference(model, cases, source or f"{what}, read as the training command reads them and segmented by "
                           f"{model.name} {model.version}")
