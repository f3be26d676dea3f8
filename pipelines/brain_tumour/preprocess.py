"""Brain MR preprocessing for BraTS-style tumour segmentation.

The chain (each step small functions in a sibling module: ``registration``
(1-3), ``bias_field`` (4), ``skull_strip`` (5), ``normalise`` (6);
:func:`preprocess_study` runs them, times each one and records why a step
was skipped)::

    {role: SeriesVolume}  (volume.series_to_image: float32, DICOM geometry)
      1 reorient          sitk.DICOMOrient to one convention (default "LPS")
      2 register          rigid (Euler3D, Mattes MI) T1/T2/FLAIR -> T1c, only
                          where a grid or frame of reference differs
      3 resample          onto the model grid: the T1c field of view at the
                          model's spacing (default 1 x 1 x 1 mm), one
                          interpolation per volume (registration folded in)
      4 N4                bias-field correction estimated on a shrunk image,
                          applied at full resolution (Tustison et al. 2010)
      5 skull-strip       when the input is not already skull-stripped
                          (deepbet, Fisch et al. 2024; morphological fallback)
      6 normalise         z-score over non-zero voxels per channel (MONAI
                          NormalizeIntensity(nonzero=True, channel_wise=True))
    = PreprocessedStudy: (C, D, H, W) float32 + the model grid + transforms
      to_reference(labels on the model grid) -> labels on the reference
      series' own grid and slice order (nearest neighbour)

This follows the BraTS preprocessing (Bakas et al. 2018, arXiv:1811.02629;
Baid et al. 2021, arXiv:2107.02314: co-registration to a common space,
1 mm isotropic resampling, skull stripping) and the input convention of the
MONAI ``brats_mri_segmentation`` bundle (channels T1c, T1, T2, FLAIR;
``NormalizeIntensityd(nonzero=True, channel_wise=True)``; the bundle reads
BraTS NIfTI as stored, without reorientation, and BraTS stores volumes LPS:
x towards the patient's left, y posterior, z superior).

Axis orders, which differ between the libraries:

- ``sitk.Image`` sizes and indices are ``(x, y, z)``.
- ``sitk.GetArrayFromImage`` gives numpy ``(z, y, x)``.
- The model array is ``(C, D, H, W)`` = numpy ``(C, z, y, x)`` of the model
  grid: each channel is ``sitk.GetArrayFromImage`` of its volume. On the
  default "LPS" grid D runs inferior -> superior, H anterior -> posterior, W
  right -> left; a BraTS case is ``(4, 155, 240, 240)``. The MONAI bundle
  reads NIfTI with ``LoadImage``, which yields ``(C, x, y, z)``
  (``(4, 240, 240, 155)``, what its roi 240 x 240 x 160 refers to): that is
  this array with its spatial axes reversed, a permutation the model wrapper
  (``pipelines/brain_tumour/model.py``, card field ``array_axes: "xyz"``)
  applies.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
import structlog

from pipelines.base import PipelineInputError
from pipelines.brain_tumour.bias_field import foreground_mask, n4_correct
from pipelines.brain_tumour.normalise import normalize_nonzero, to_channels_first
from pipelines.brain_tumour.registration import (
    DEFAULT_ORIENTATION,
    Registration,
    image_centre,
    model_grid,
    orientation_code,
    register_rigid,
    reorient,
    resample_to_grid,
    same_grid,
)
from pipelines.brain_tumour.skull_strip import StripCheck, default_extractor, skull_strip_check
from pipelines.brain_tumour.volume import SeriesVolume
from pipelines.common.resample import labels_onto_grid

__all__ = ["DEFAULT_CHANNEL_ORDER", "PreprocessedStudy", "preprocess_study", "to_reference"]

#: Channel order of the MONAI brats_mri_segmentation bundle.
DEFAULT_CHANNEL_ORDER: tuple[str, ...] = ("T1c", "T1", "T2", "FLAIR")

# --------------------------------------------------------------------------- the chain


@dataclass
class PreprocessedStudy:
    """What :func:`preprocess_study` gives the model and :func:`to_reference`.

    Attributes
    ----------
    array:
        ``(C, D, H, W)`` float32 network input in ``channel_order``; numpy
        ``(c, z, y, x)`` of ``grid`` (see the module docstring).
    channel_order:
        Role of each channel.
    grid:
        uint8 ``sitk.Image`` on the model grid (sitk size ``(W, H, D)``, spacing,
        origin, direction in LPS mm): 1 inside the brain mask used for
        skull stripping, or inside the non-zero region of the reference channel when the input was
        already stripped.
    reference_role:
        The role whose volume defines the grid (T1c by default).
    series_uids:
        role -> Series Instance UID of its input volume.
    transforms:
        Series Instance UID -> transform mapping model-grid physical points
        to that series' physical points (identity for the reference and for
        series that were not registered).
    registrations:
        role -> :class:`Registration` (skipped ones included, with the reason).
    strip_checks:
        role -> :class:`StripCheck` of its input volume.
    skull_stripped_here:
        The method that stripped the skull in this run (``"deepbet"``,
        ``"morphological (deepbet not installed)"``, or the given extractor's
        ``name``); ``None`` when stripping was skipped.
    timings:
        step -> wall time in seconds.
    cpu_seconds:
        step -> CPU time of the whole process (all threads) in seconds; with
        ``timings`` it shows how much of a step ran in parallel, and it is
        less disturbed than wall time by other work on a shared machine.
    notes:
        What each step did or skipped, in order; also sent to the log.
    """

    array: np.ndarray
    channel_order: tuple[str, ...]
    grid: sitk.Image
    reference_role: str
    series_uids: dict[str, str]
    transforms: dict[str, sitk.Transform]
    registrations: dict[str, Registration]
    strip_checks: dict[str, StripCheck]
    skull_stripped_here: str | None
    timings: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size of :attr:`array` as ``(D, H, W)`` mm (sitk spacing reversed)."""
        x, y, z = self.grid.GetSpacing()
        return (z, y, x)

    @property
    def brain_mask(self) -> np.ndarray:
        """``(D, H, W)`` bool view of :attr:`grid`."""
        return sitk.GetArrayViewFromImage(self.grid) > 0


class _Steps:
    """Times steps and collects notes; sends both to a structlog-style logger."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.timings: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.notes: list[str] = []
        self._step = ""
        self._t0 = 0.0
        self._c0 = 0.0

    def __call__(self, step: str) -> _Steps:
        self._step = step
        return self

    def __enter__(self) -> _Steps:
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self._t0
        self.timings[self._step] = self.timings.get(self._step, 0.0) + seconds
        self.cpu_seconds[self._step] = self.cpu_seconds.get(self._step, 0.0) + time.process_time() - self._c0
        if exc[0] is None:
            self.log.info("brain_preprocess_step", step=self._step, seconds=round(seconds, 3))

    def note(self, text: str) -> None:
        self.notes.append(f"{self._step}: {text}")
        self.log.info("brain_preprocess_note", step=self._step, note=text)


def preprocess_study(
    volumes: Mapping[str, SeriesVolume],
    *,
    channel_order: Sequence[str] = DEFAULT_CHANNEL_ORDER,
    reference_role: str = "T1c",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    orientation: str = DEFAULT_ORIENTATION,
    n4: bool = True,
    n4_shrink_factor: int = 4,
    n4_iterations: Sequence[int] = (50, 50, 50, 50),
    n4_workers: int | None = None,
    skull_strip: Literal["auto", "always", "never"] = "auto",
    brain_extractor: Callable[[sitk.Image], sitk.Image] | None = None,
    device: str = "cpu",
    log: Any = None,
) -> PreprocessedStudy:
    """Prepare a four-sequence brain MR study for a BraTS-trained network.

    Steps (module docstring): reorient, register (only where grids or frames
    of reference differ), resample to ``spacing`` on the reference-derived
    grid, N4, skull-strip (per ``skull_strip``), z-score over non-zero voxels.

    Parameters
    ----------
    volumes:
        role (``"T1"``, ``"T1c"``, ``"T2"``, ``"FLAIR"``) -> :class:`SeriesVolume`
        from :func:`~pipelines.brain_tumour.volume.series_to_image`.
    channel_order:
        Roles in the network's channel order (the model card's; the MONAI
        bundle's is T1c, T1, T2, FLAIR).
    reference_role:
        The volume the others are registered to and whose field of view and
        direction define the model grid.
    spacing:
        Model grid spacing in mm in sitk order ``(x, y, z)`` (the model
        card's; reverse a ``(D, H, W)`` spacing).
    orientation:
        Axis convention of the model grid (``"LPS"`` = BraTS storage order).
    n4, n4_shrink_factor, n4_iterations:
        Bias-field correction on/off, shrink factor, iterations per level.
    n4_workers:
        Volumes corrected at once (threads; SimpleITK releases the GIL). N4's
        fit is nearly single-threaded, so on two cores two at a time halve
        the step's wall time. ``None``: ``min(volumes, os.cpu_count())``.
    skull_strip:
        ``"auto"``: strip unless every volume passes :func:`skull_strip_check`;
        ``"always"``; ``"never"``.
    brain_extractor:
        Callable T1-weighted ``sitk.Image`` -> uint8 brain mask on its grid;
        ``None`` makes a :class:`DeepbetExtractor` when needed, or falls back
        to :func:`morphological_brain_mask` (noted) when deepbet is absent.
        Pipelines pass one extractor they keep, so the networks load once.
    device:
        torch device for the default extractor.
    log:
        structlog-style logger (``log.info(event, **fields)``); ``None``:
        ``structlog.get_logger("pipelines")``, as :class:`PipelineContext`'s.

    Returns
    -------
    :class:`PreprocessedStudy`.

    Raises
    ------
    PipelineInputError (a ValueError)
        A role of ``channel_order`` or ``reference_role`` has no volume; a
        volume is not 3-D.
    ValueError
        Invalid ``spacing``, ``orientation`` or ``skull_strip``.
    """
    if skull_strip not in ("auto", "always", "never"):
        raise ValueError(f"skull_strip must be 'auto', 'always' or 'never', got {skull_strip!r}")
    channel_order = tuple(channel_order)
    roles = list(dict.fromkeys([reference_role, *channel_order]))
    missing = [r for r in roles if r not in volumes]
    if missing:
        raise PipelineInputError(f"no {', '.join(missing)} series: the brain tumour model needs {', '.join(roles)}")
    steps = _Steps(log if log is not None else structlog.get_logger("pipelines"))
    images = _reorient(volumes, roles, orientation, steps)
    fixed = images[reference_role]
    registrations = _register(volumes, images, roles, reference_role, steps)
    grid = _resample(images, registrations, roles, fixed, spacing, reference_role, steps)
    strip_checks = {r: skull_strip_check(volumes[r].image) for r in roles}
    with steps("n4"):
        if n4:
            _correct_bias(images, roles, strip_checks, n4_shrink_factor, n4_iterations, n4_workers, steps)
        else:
            steps.note("disabled")
    brain, stripped_here = _skull_strip(
        images, roles, grid, strip_checks, skull_strip, brain_extractor, device, reference_role, steps
    )

    # 6 z-score over non-zero voxels, channel by channel.
    with steps("normalise"):
        array = normalize_nonzero(to_channels_first(images, channel_order))
    del images

    brain.CopyInformation(grid)
    return PreprocessedStudy(
        array=array,
        channel_order=channel_order,
        grid=brain,
        reference_role=reference_role,
        series_uids={r: volumes[r].series_instance_uid for r in roles},
        transforms={volumes[r].series_instance_uid: registrations[r].transform for r in roles},
        registrations=registrations,
        strip_checks=strip_checks,
        skull_stripped_here=stripped_here,
        timings=steps.timings,
        cpu_seconds=steps.cpu_seconds,
        notes=steps.notes,
    )


def _reorient(
    volumes: Mapping[str, SeriesVolume], roles: Sequence[str], orientation: str, steps: _Steps
) -> dict[str, sitk.Image]:
    """Step 1: one axis convention for every volume (lossless)."""
    with steps("reorient"):
        images = {r: reorient(volumes[r].image, orientation) for r in roles}
        for r in roles:
            before = orientation_code(volumes[r].image)
            if before != orientation:
                steps.note(f"{r}: {before} -> {orientation}")
    return images


def _register(
    volumes: Mapping[str, SeriesVolume],
    images: Mapping[str, sitk.Image],
    roles: Sequence[str],
    reference_role: str,
    steps: _Steps,
) -> dict[str, Registration]:
    """Step 2: register each volume to the reference where grids or frames of reference differ."""
    fixed = images[reference_role]
    ref_volume = volumes[reference_role]
    registrations: dict[str, Registration] = {}
    with steps("register"):
        for r in roles:
            identity = sitk.Euler3DTransform()
            identity.SetCenter(image_centre(fixed))
            same_frame = volumes[r].frame_of_reference_uid == ref_volume.frame_of_reference_uid
            if r == reference_role:
                registrations[r] = Registration(identity, False, "reference volume")
            elif same_frame and same_grid(images[r], fixed):
                why = f"same grid and frame of reference as {reference_role}"
                registrations[r] = Registration(identity, False, why)
                steps.note(f"{r}: skipped, same grid and frame of reference as {reference_role}")
            else:
                why = "different frame of reference" if not same_frame else f"grid differs from {reference_role}"
                registrations[r] = register_rigid(fixed, images[r], same_frame_of_reference=same_frame)
                reg = registrations[r]
                steps.note(
                    f"{r} -> {reference_role} ({why}): rotation "
                    f"{tuple(round(a, 2) for a in reg.rotation_degrees)} deg, translation "
                    f"{tuple(round(t, 2) for t in reg.translation_mm)} mm, MI {reg.metric:.4f}; {reg.reason}"
                )
    return registrations


def _resample(
    images: dict[str, sitk.Image],
    registrations: Mapping[str, Registration],
    roles: Sequence[str],
    fixed: sitk.Image,
    spacing: Sequence[float],
    reference_role: str,
    steps: _Steps,
) -> sitk.Image:
    """Step 3: resample ``images`` (in place) onto the model grid, registration
    folded into one interpolation; returns the grid."""
    with steps("resample"):
        grid = model_grid(fixed, spacing)
        for r in roles:
            if not registrations[r].registered and same_grid(images[r], grid):
                images[r] = sitk.Cast(images[r], sitk.sitkFloat32)
            else:
                images[r] = resample_to_grid(images[r], grid, registrations[r].transform)
                steps.note(f"{r}: resampled (linear) to {grid.GetSize()} voxels at {grid.GetSpacing()} mm")
        if same_grid(fixed, grid):
            steps.note(
                f"model grid = the {reference_role} grid {grid.GetSize()} at {grid.GetSpacing()} mm: no resampling"
            )
    return grid


def _correct_bias(
    images: dict[str, sitk.Image],
    roles: Sequence[str],
    strip_checks: Mapping[str, StripCheck],
    shrink_factor: int,
    iterations: Sequence[int],
    n4_workers: int | None,
    steps: _Steps,
) -> None:
    """Step 4: N4 on every volume (in place), the field fitted on a shrunk
    image inside the head/brain mask, ``n4_workers`` volumes at a time."""
    workers = max(1, n4_workers or min(len(roles), os.cpu_count() or 1))

    # The image comes in as an argument: a closure must not read
    # ``images``, which the caller deletes once it is normalised.
    def correct(role: str, image: sitk.Image) -> sitk.Image:
        mask = foreground_mask(image, stripped=strip_checks[role].stripped)
        return n4_correct(image, mask, shrink_factor=shrink_factor, iterations=iterations)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        corrected = dict(zip(roles, pool.map(correct, roles, [images[r] for r in roles]), strict=True))
    images.update(corrected)
    del corrected
    steps.note(f"shrink x{shrink_factor}, iterations {tuple(iterations)}, {workers} volume(s) at a time")


def _skull_strip(
    images: dict[str, sitk.Image],
    roles: Sequence[str],
    grid: sitk.Image,
    strip_checks: Mapping[str, StripCheck],
    skull_strip: str,
    brain_extractor: Callable[[sitk.Image], sitk.Image] | None,
    device: str,
    reference_role: str,
    steps: _Steps,
) -> tuple[sitk.Image, str | None]:
    """Step 5: mask ``images`` (in place) with a brain mask unless skipped.

    Returns the uint8 brain mask (or the reference's non-zero region when
    skipped) and the stripping method, ``None`` when skipped.
    """
    all_stripped = all(c.stripped for c in strip_checks.values())
    stripped_here: str | None = None
    with steps("skull_strip"):
        for r in roles:
            steps.note(f"{r}: {strip_checks[r].reason}")
        if skull_strip == "never" or (skull_strip == "auto" and all_stripped):
            steps.note(
                "skipped: " + ("skull_strip=never" if skull_strip == "never" else "input already skull-stripped")
            )
            brain = sitk.Cast(images[reference_role] != 0, sitk.sitkUInt8)
        else:
            if brain_extractor is not None:
                extractor = brain_extractor
                method = getattr(brain_extractor, "name", getattr(brain_extractor, "__name__", "custom"))
            else:
                extractor, method = default_extractor(device)
            t1w = "T1" if "T1" in images else reference_role
            brain = sitk.Cast(extractor(images[t1w]), sitk.sitkUInt8)
            brain.CopyInformation(grid)
            for r in roles:
                images[r] = sitk.Mask(images[r], brain)
            stripped_here = method
            steps.note(f"brain mask from {t1w} by {method}: {int(sitk.GetArrayViewFromImage(brain).sum())} voxels")
    return brain, stripped_here


def to_reference(labels_on_model_grid: np.ndarray, prep: PreprocessedStudy, reference: SeriesVolume) -> np.ndarray:
    """Labels on the model grid -> labels on a source series' own grid.

    Nearest-neighbour resampling (labels are never averaged) through the
    inverse of the series' registration, onto ``reference.image``'s grid, so
    the SEG lies exactly on the images a radiologist scrolls.

    Parameters
    ----------
    labels_on_model_grid:
        ``(D, H, W)`` integer labels (e.g. BraTS 0/1/2/4), the layout of
        ``prep.array[c]``: numpy ``(z, y, x)`` of ``prep.grid``.
    prep:
        The :class:`PreprocessedStudy` the labels were predicted from.
    reference:
        One of the series given to :func:`preprocess_study` (by default the
        ``settings.reference_role`` one, the T1c).

    Returns
    -------
    ``(n_slices, Rows, Columns)`` uint8 in ``reference``'s slice order:
    ``out[k]`` lies on ``reference.slices[k]`` (its pixel rows and columns).

    Raises
    ------
    ValueError
        ``labels_on_model_grid`` does not have the grid's shape ``(D, H, W)``
        or holds values outside 0..255; ``reference`` was not an input of
        ``prep``.
    """
    expected = tuple(prep.grid.GetSize())[::-1]
    if labels_on_model_grid.shape != expected:
        raise ValueError(
            f"labels_on_model_grid has shape {labels_on_model_grid.shape}, "
            f"expected the model grid's (D, H, W) {expected}"
        )
    if labels_on_model_grid.dtype != np.uint8:
        if labels_on_model_grid.size and (labels_on_model_grid.min() < 0 or labels_on_model_grid.max() > 255):
            raise ValueError("labels_on_model_grid holds values outside 0..255")
        labels_on_model_grid = labels_on_model_grid.astype(np.uint8)
    transform = prep.transforms.get(reference.series_instance_uid)
    if transform is None:
        raise ValueError(
            f"reference series {reference.series_instance_uid} was not an input of preprocess_study "
            f"(inputs: {sorted(prep.transforms)})"
        )
    labels = sitk.GetImageFromArray(np.ascontiguousarray(labels_on_model_grid))
    labels.CopyInformation(prep.grid)
    return labels_onto_grid(labels, reference.image, transform.GetInverse())
