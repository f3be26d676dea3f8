"""Chest radiograph preprocessing shared by training and inference.

The chain, each step a small callable on :class:`CxrImage`::

    DICOM dataset --dicom_to_image--> SourceImage (H, W) float32 in [0, 1]
    PNG file      --png_to_image----> SourceImage (training images)
        -> ResampleIsotropic (square pixels from Pixel Spacing / Imager Pixel Spacing)
        -> PadToSquare       (black border, keeps all anatomy)
        -> Resize            (to the card's input size)
        -> Clahe             (when the card's input spec asks for it)
    = CxrPreprocessor.prepare  -> CxrImage (H, W) float32 in [0, 1] + Geometry
        -> CxrPreprocessor.to_network_input -> (C, H, W) float32 in the card's
           intensity range ((2x - 1) * 1024 = [-1024, 1024] as torchxrayvision)

Training reads the 8-bit PNGs through :func:`png_to_image` and the same
:meth:`CxrPreprocessor.prepare`, then augments in [0, 1] and calls the same
:meth:`CxrPreprocessor.to_network_input`, so the two cannot drift.

Every geometric step composes an affine map into :class:`Geometry`, which takes
an array on the model-input grid (e.g. a Grad-CAM map, ``(224, 224)``) back onto
the source pixel grid ``(Rows, Columns)`` in one interpolation, and the
reverse. Pixel centres follow skimage/scipy ``grid_mode``: output pixel ``i``
of a resize from ``n`` to ``m`` pixels samples input coordinate
``(i + 0.5) * n / m - 0.5``.

Notes (why a step was skipped, which VOI was used, ...) are collected in
``notes`` for the pipeline to log.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from scipy import ndimage
from skimage import exposure, transform

from models.card import InputSpec

__all__ = [
    "PixelSpacing",
    "SourceImage",
    "Geometry",
    "CxrImage",
    "PreprocessedImage",
    "read_pixel_spacing",
    "dicom_to_image",
    "png_to_image",
    "rescale_to_unit",
    "ResampleIsotropic",
    "PadToSquare",
    "Resize",
    "Clahe",
    "ScaleIntensity",
    "CxrPreprocessor",
]


# --------------------------------------------------------------------------- source images


@dataclass(frozen=True)
class PixelSpacing:
    """Physical pixel size of the source image.

    Attributes
    ----------
    spacing:
        ``(row_spacing, column_spacing)`` in mm (PS3.3 10.7.1.3: the first value
        is the distance between rows, the second between columns), or ``None``
        when no valid spacing is known.
    source:
        ``"PixelSpacing"`` (0028,0030) or ``"ImagerPixelSpacing"`` (0018,1164).
    reason:
        Why ``spacing`` is ``None``, or which fallback was taken; for the log.
    """

    spacing: tuple[float, float] | None
    source: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.spacing is not None:
            if len(self.spacing) != 2 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
                raise ValueError(f"PixelSpacing.spacing must be two positive finite mm values, got {self.spacing}")


@dataclass(frozen=True)
class SourceImage:
    """A grey-scale image before any geometric step.

    Attributes
    ----------
    image:
        ``(Rows, Columns)`` float32 in [0, 1], 0 = black (MONOCHROME2 sense).
    spacing:
        Pixel size, see :class:`PixelSpacing`.
    notes:
        What was done or skipped, for the log.
    """

    image: np.ndarray
    spacing: PixelSpacing
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.image.ndim != 2 or self.image.dtype != np.float32:
            raise ValueError(
                f"SourceImage.image must be a 2-D float32 array, got {self.image.dtype} {self.image.shape}"
            )


def _check_spacing(values, keyword: str) -> tuple[float, float] | str:
    """The (row, column) spacing in mm, or why ``values`` is not usable."""
    try:
        spacing = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return f"{keyword} {values!r} is not numeric"
    if len(spacing) != 2:
        return f"{keyword} has {len(spacing)} values, expected 2"
    if not all(math.isfinite(s) for s in spacing):
        return f"{keyword} {spacing} is not finite"
    if not all(s > 0 for s in spacing):
        return f"{keyword} {spacing} is zero or negative"
    return (spacing[0], spacing[1])


def read_pixel_spacing(ds: Dataset) -> PixelSpacing:
    """Pixel spacing of a projection radiograph.

    Pixel Spacing (0028,0030) is used when valid, else Imager Pixel Spacing
    (0018,1164) (PS3.3 10.7.1.1: spacing at the detector; for our purpose of
    making pixels square, its aspect ratio is what matters). Absent, zero,
    negative, non-numeric or wrongly sized values are refused with a reason.

    Returns
    -------
    :class:`PixelSpacing`; ``spacing`` is ``None`` with ``reason`` set when
    neither attribute is usable. Never raises for bad values.
    """
    reasons = []
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None or value == "" or (hasattr(value, "__len__") and len(value) == 0):
            reasons.append(f"{keyword} is absent")
            continue
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            value = [value]
        checked = _check_spacing(value, keyword)
        if isinstance(checked, tuple):
            return PixelSpacing(checked, keyword, "; ".join(reasons) or None)
        reasons.append(checked)
    return PixelSpacing(None, None, "; ".join(reasons))


def rescale_to_unit(values: np.ndarray, what: str = "image") -> np.ndarray:
    """Linearly map an array's minimum to 0 and maximum to 1.

    Parameters
    ----------
    values:
        Any real array.

    Returns
    -------
    float32 array of the same shape in [0, 1].

    Raises
    ------
    ValueError
        The array is constant or holds non-finite values (nothing to show).
    """
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{what}: holds non-finite values")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        raise ValueError(f"{what}: constant image (every pixel is {lo}); nothing to analyse")
    return ((v - lo) / (hi - lo)).astype(np.float32)


def dicom_to_image(ds: Dataset) -> SourceImage:
    """Grey-scale radiograph from a single-frame DICOM dataset.

    Steps (PS3.3 C.11 and C.7.6.3.1.2):

    1. stored values -> Modality LUT / Rescale (pydicom ``apply_modality_lut``);
    2. VOI LUT Sequence or Window Center/Width when present (pydicom
       ``apply_voi_lut``, first VOI); else the full range of values is kept;
    3. linear scaling of the result to [0, 1] by its own min and max
       (:func:`rescale_to_unit`), the way 8-bit training images span 0-255;
    4. MONOCHROME1 (minimum = white) is inverted to MONOCHROME2 (1 - x).

    Parameters
    ----------
    ds:
        A dataset with Pixel Data, Samples per Pixel 1, Photometric
        Interpretation MONOCHROME1 or MONOCHROME2, one frame. Compressed
        transfer syntaxes decode through pydicom's plug-ins (pylibjpeg).

    Returns
    -------
    :class:`SourceImage` with ``image`` of shape ``(Rows, Columns)`` float32 in
    [0, 1], and its :func:`read_pixel_spacing`.

    Raises
    ------
    ValueError
        Naming the attribute: no or empty Pixel Data, pixel data that cannot
        be decoded, colour or multi-frame image, unsupported Photometric
        Interpretation, constant image.
    """
    if "PixelData" not in ds:
        raise ValueError("PixelData (7FE0,0010) is absent")
    if not ds.PixelData:  # zero length: pydicom reads None and its decoder fails with a TypeError
        raise ValueError("PixelData (7FE0,0010) is empty (zero length)")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"SamplesPerPixel is {ds.SamplesPerPixel}, expected 1 (grey-scale radiograph)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"PhotometricInterpretation is {photometric!r}, expected MONOCHROME1 or MONOCHROME2")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError(f"NumberOfFrames is {ds.NumberOfFrames}, expected a single-frame radiograph")

    notes = []
    try:
        pixels = ds.pixel_array
    except ValueError as exc:  # pydicom: length does not match Rows x Columns x bits, bad fragments
        raise ValueError(f"PixelData (7FE0,0010) cannot be decoded: {exc}") from exc
    arr = apply_modality_lut(pixels, ds)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        arr = apply_voi_lut(arr, ds, index=0)
        how = "VOI LUT Sequence" if "VOILUTSequence" in ds else (
            f"window center {ds.WindowCenter} width {ds.WindowWidth}"
        )
        notes.append(f"VOI: {how}")
    else:
        notes.append("VOI: none in the header; full value range used")
    image = rescale_to_unit(arr, "PixelData")
    if photometric == "MONOCHROME1":
        image = 1.0 - image
        notes.append("MONOCHROME1 inverted to MONOCHROME2")
    spacing = read_pixel_spacing(ds)
    if spacing.spacing is None:
        notes.append(f"pixel spacing unknown: {spacing.reason}")
    return SourceImage(np.ascontiguousarray(image, dtype=np.float32), spacing, tuple(notes))


def png_to_image(path: Path) -> SourceImage:
    """Grey-scale image from a PNG file (training data), scaled as DICOM images are.

    Parameters
    ----------
    path:
        8- or 16-bit grey PNG; RGB(A) files use their first channel (the NIH
        ChestX-ray14 release has a few RGBA images with equal channels).

    Returns
    -------
    :class:`SourceImage` ``(H, W)`` float32 in [0, 1] by :func:`rescale_to_unit`,
    spacing unknown (PNG has none).

    Raises
    ------
    ValueError
        Constant image or unexpected number of dimensions.
    """
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D grey image, got shape {arr.shape}")
    return SourceImage(
        rescale_to_unit(arr, str(path)), PixelSpacing(None, None, "PNG files carry no pixel spacing")
    )


# --------------------------------------------------------------------------- geometry


def _resize_matrix(in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    """(3, 3) affine taking input (row, col) to output (row, col) of a
    pixel-area-aligned resize: ``out = (in + 0.5) * m / n - 0.5``."""
    s = np.array([out_shape[0] / in_shape[0], out_shape[1] / in_shape[1]])
    m = np.eye(3)
    m[0, 0], m[1, 1] = s
    m[:2, 2] = 0.5 * s - 0.5
    return m


def _translate_matrix(rows: float, cols: float) -> np.ndarray:
    m = np.eye(3)
    m[:2, 2] = rows, cols
    return m


@dataclass(frozen=True)
class Geometry:
    """Where the current grid lies on the source pixel grid.

    Attributes
    ----------
    source_shape:
        ``(Rows, Columns)`` of the source image.
    shape:
        ``(H, W)`` of the current grid (the model input after the full chain).
    matrix:
        ``(3, 3)`` float64 affine taking homogeneous source ``(row, col, 1)``
        (pixel-centre coordinates) to current-grid coordinates.
    """

    source_shape: tuple[int, int]
    shape: tuple[int, int]
    matrix: np.ndarray = field(default_factory=lambda: np.eye(3))

    @classmethod
    def identity(cls, shape: tuple[int, int]) -> Geometry:
        return cls(shape, shape, np.eye(3))

    def then(self, matrix: np.ndarray, shape: tuple[int, int]) -> Geometry:
        """Compose a further step ``current -> new`` of output ``shape``."""
        return Geometry(self.source_shape, (int(shape[0]), int(shape[1])), matrix @ self.matrix)

    def to_source(self, array: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample an array on the current grid onto the source grid.

        Parameters
        ----------
        array:
            ``shape`` (e.g. ``(224, 224)``) float or bool array.
        order:
            Spline order: 1 = bilinear (maps, probabilities), 0 = nearest (labels).

        Returns
        -------
        ``source_shape`` ``(Rows, Columns)`` float32 array; source pixels that
        fall outside the current grid (e.g. never, for padding) get 0.

        Raises
        ------
        ValueError
            ``array`` is not of shape ``shape``.
        """
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} is not the geometry's shape {self.shape}")
        # affine_transform maps each output (source) pixel to its input (current) coordinate
        return ndimage.affine_transform(
            np.asarray(array, dtype=np.float32),
            self.matrix[:2, :2],
            offset=self.matrix[:2, 2],
            output_shape=self.source_shape,
            order=order,
            mode="nearest" if order == 0 else "constant",
            cval=0.0,
        ).astype(np.float32)

    def from_source(self, array: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample a source-grid array ``(Rows, Columns)`` onto the current grid
        ``shape``, float32. Point sampling: no anti-aliasing (use it for masks
        and checks, not for the image itself)."""
        if tuple(array.shape) != self.source_shape:
            raise ValueError(f"array shape {array.shape} is not the source shape {self.source_shape}")
        inv = np.linalg.inv(self.matrix)
        return ndimage.affine_transform(
            np.asarray(array, dtype=np.float32),
            inv[:2, :2],
            offset=inv[:2, 2],
            output_shape=self.shape,
            order=order,
            mode="constant",
            cval=0.0,
        ).astype(np.float32)


@dataclass(frozen=True)
class CxrImage:
    """An image in the chain with its geometry and notes.

    ``image`` is ``geometry.shape`` float32 in [0, 1]; ``spacing`` is the
    current pixel size in mm, or None when unknown.
    """

    image: np.ndarray
    geometry: Geometry
    spacing: tuple[float, float] | None
    notes: tuple[str, ...] = ()

    @classmethod
    def from_source(cls, src: SourceImage) -> CxrImage:
        return cls(src.image, Geometry.identity(src.image.shape), src.spacing.spacing, src.notes)

    def noted(self, note: str) -> CxrImage:
        return replace(self, notes=self.notes + (note,))


# --------------------------------------------------------------------------- transforms


class ResampleIsotropic:
    """Resample to square pixels at the finer of the two spacings.

    Input/output: :class:`CxrImage`, ``(H, W)`` -> ``(H', W')`` float32 [0, 1].
    With unknown spacing the image is passed through unchanged and the note
    says why (the pipeline logs it); an already isotropic image (spacings
    within ``tolerance``, relative) is passed through too.
    """

    def __init__(self, tolerance: float = 1e-3) -> None:
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
        self.tolerance = tolerance

    def __call__(self, img: CxrImage) -> CxrImage:
        if img.spacing is None:
            return img.noted("isotropic resampling skipped: pixel spacing unknown")
        rs, cs = img.spacing
        target = min(rs, cs)
        if abs(rs - cs) <= self.tolerance * target:
            return img.noted(f"isotropic resampling not needed: spacing {rs:g} x {cs:g} mm")
        h, w = img.image.shape
        shape = (max(1, round(h * rs / target)), max(1, round(w * cs / target)))
        out = transform.resize(img.image, shape, order=1, mode="edge", anti_aliasing=False).astype(np.float32)
        return CxrImage(
            out,
            img.geometry.then(_resize_matrix((h, w), shape), shape),
            (target, target),
            img.notes + (f"resampled {h}x{w} at {rs:g}x{cs:g} mm to {shape[0]}x{shape[1]} at {target:g} mm",),
        )


class PadToSquare:
    """Pad the shorter side equally on both sides (``value``, black by
    default) so that resizing keeps the aspect ratio and all anatomy.

    Input/output: :class:`CxrImage` ``(H, W)`` -> ``(S, S)``, S = max(H, W).
    """

    def __init__(self, value: float = 0.0) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"value must be in [0, 1], got {value}")
        self.value = value

    def __call__(self, img: CxrImage) -> CxrImage:
        h, w = img.image.shape
        s = max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        if (h, w) == (s, s):
            return img
        out = np.full((s, s), self.value, dtype=np.float32)
        out[top : top + h, left : left + w] = img.image
        return CxrImage(out, img.geometry.then(_translate_matrix(top, left), (s, s)), img.spacing, img.notes)


class Resize:
    """Resize to ``size`` ``(H, W)`` with bilinear interpolation and
    anti-aliasing when shrinking (skimage ``transform.resize``).

    Input/output: :class:`CxrImage` ``(h, w)`` -> ``size``, float32 [0, 1].
    """

    def __init__(self, size: tuple[int, int]) -> None:
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (H, W) of positive ints, got {size}")
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, img: CxrImage) -> CxrImage:
        h, w = img.image.shape
        if (h, w) == self.size:
            return img
        shrink = h > self.size[0] or w > self.size[1]
        out = transform.resize(img.image, self.size, order=1, mode="edge", anti_aliasing=shrink)
        out = np.clip(out, 0.0, 1.0).astype(np.float32)
        spacing = None if img.spacing is None else (img.spacing[0] * h / self.size[0], img.spacing[1] * w / self.size[1])
        return CxrImage(out, img.geometry.then(_resize_matrix((h, w), self.size), self.size), spacing, img.notes)


class Clahe:
    """Contrast-limited adaptive histogram equalisation (Zuiderveld 1994),
    skimage ``exposure.equalize_adapthist`` with its default 1/8-image tiles.

    Input/output: :class:`CxrImage` ``(H, W)`` float32 [0, 1], geometry unchanged.
    """

    def __init__(self, clip_limit: float = 0.01) -> None:
        if not 0.0 < clip_limit <= 1.0:
            raise ValueError(f"clip_limit must be in (0, 1], got {clip_limit}")
        self.clip_limit = clip_limit

    def __call__(self, img: CxrImage) -> CxrImage:
        out = exposure.equalize_adapthist(img.image, clip_limit=self.clip_limit).astype(np.float32)
        return replace(img, image=out)


class ScaleIntensity:
    """Map [0, 1] linearly onto ``(low, high)``; torchxrayvision's
    ``normalize`` is ``(2 x - 1) * 1024``, i.e. ``(-1024, 1024)``.

    Input: array of any shape in [0, 1]; output: float32, same shape.
    """

    def __init__(self, low: float = -1024.0, high: float = 1024.0) -> None:
        if not low < high:
            raise ValueError(f"low must be below high, got {low}, {high}")
        self.low, self.high = float(low), float(high)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) * (self.high - self.low) + self.low).astype(np.float32)


# --------------------------------------------------------------------------- the chain


@dataclass(frozen=True)
class PreprocessedImage:
    """What the network needs plus what maps results back.

    Attributes
    ----------
    tensor:
        ``(C, H, W)`` float32 in the card's intensity range: the network input.
    prepared:
        The image before intensity scaling, ``(H, W)`` float32 in [0, 1], with
        its :class:`Geometry` (source grid -> model grid) and notes.
    """

    tensor: np.ndarray
    prepared: CxrImage

    @property
    def geometry(self) -> Geometry:
        return self.prepared.geometry

    @property
    def notes(self) -> tuple[str, ...]:
        return self.prepared.notes


class CxrPreprocessor:
    """The preprocessing a model card's :class:`~models.card.InputSpec` asks for.

    Parameters
    ----------
    spec:
        The card's input spec (size, CLAHE, resampling, padding, intensity range).
    """

    def __init__(self, spec: InputSpec) -> None:
        if not isinstance(spec, InputSpec):
            raise ValueError(f"spec must be an InputSpec, got {type(spec).__name__}")
        self.spec = spec
        steps: list[Callable[[CxrImage], CxrImage]] = []
        if spec.isotropic_resampling:
            steps.append(ResampleIsotropic())
        if spec.pad_to_square:
            steps.append(PadToSquare(0.0))
        steps.append(Resize(spec.size))
        if spec.clahe:
            steps.append(Clahe(spec.clahe_clip_limit))
        self.steps: tuple = tuple(steps)
        self.scale = ScaleIntensity(*spec.intensity_range)

    def prepare(self, src: SourceImage) -> CxrImage:
        """Geometric and contrast steps: ``(Rows, Columns)`` -> ``spec.size``,
        float32 in [0, 1], with the geometry back to the source grid."""
        img = CxrImage.from_source(src)
        for step in self.steps:
            img = step(img)
        return img

    def to_network_input(self, image01: np.ndarray) -> np.ndarray:
        """``(H, W)`` float32 in [0, 1] -> ``(C, H, W)`` float32 in the intensity
        range (the grey image repeated over C channels)."""
        x = self.scale(image01)
        return np.repeat(x[None], self.spec.channels, axis=0)

    def __call__(self, src: SourceImage) -> PreprocessedImage:
        prepared = self.prepare(src)
        return PreprocessedImage(self.to_network_input(prepared.image), prepared)

    def from_dicom(self, ds: Dataset) -> PreprocessedImage:
        """:func:`dicom_to_image` then the chain. Raises ValueError as
        :func:`dicom_to_image` does."""
        return self(dicom_to_image(ds))
