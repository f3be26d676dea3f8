"""PNG previews of a job's SEG on its source pixels, drawn by the node itself
(numpy + Pillow), for the dashboard (``GET /previews/{job_id}.png``).

- The SEG is read from the outbox (pydicom; frames by
  :func:`pipelines.common.seg_frames.segmentation_frames`). Each frame's
  source image is its Derivation Image Sequence > Source Image Sequence >
  Referenced SOP Instance UID (PS3.3 C.7.6.16.2.6, A.51.5.1), else the one
  instance of the Referenced Series Sequence; the source file comes from
  the spool, by its path in the index.
- The slice shown is the source image with the most segmented pixels (all
  segments together): for a radiograph its one image, for an MR study the
  T1c slice of largest tumour area.
- Source pixels are made display-ready as the pneumonia pipeline reads them
  (:func:`pipelines.pneumonia.preprocess.dicom_to_image`: Modality LUT, VOI
  LUT or window, MONOCHROME1 inverted); an image without VOI is stretched
  between its 1st and 99.5th percentile instead of its extremes, so that
  an MR slice is not drawn dark by a few bright voxels.
- Each segment is drawn in its Recommended Display CIELab Value (PS3.3
  C.8.20.2, converted to sRGB), as an outline (the morphological gradient
  of its mask at display size: dilation minus erosion) over a light fill,
  or the outline alone for a single-segment SEG (the radiograph's attention
  region, whose inside must stay readable).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from scipy import ndimage

#: Long side of a preview, pixels; smaller sources are enlarged to at least MIN_SIDE.
MAX_SIDE = 512
MIN_SIDE = 320
FILL_ALPHA = 0.30
#: Segment colours when a SEG recommends none: red, green, yellow, then others.
FALLBACK_RGB = ((255, 64, 64), (64, 220, 64), (255, 230, 0), (80, 160, 255), (255, 128, 0))


class PreviewError(LookupError):
    """No preview can be drawn: the SEG or its source is gone (retention) or
    unreadable. The message says which file and why."""


@dataclass(frozen=True)
class Slice:
    source_uid: str
    masks: dict[int, np.ndarray]  # segment number -> bool (Rows, Columns)


def frame_sources(seg: pydicom.Dataset) -> list[str | None]:
    """Referenced SOP Instance UID of each frame's source image (None: not stated)."""
    per_frame = seg.get("PerFrameFunctionalGroupsSequence", [])
    shared = seg.get("SharedFunctionalGroupsSequence", [pydicom.Dataset()])[0]
    fallback = None
    for series in seg.get("ReferencedSeriesSequence", []):
        instances = series.get("ReferencedInstanceSequence", [])
        if len(instances) == 1:
            fallback = str(instances[0].ReferencedSOPInstanceUID)
    out: list[str | None] = []
    for index in range(int(seg.get("NumberOfFrames", 1))):
        item = per_frame[index] if len(per_frame) > index else pydicom.Dataset()
        derivation = item.get("DerivationImageSequence") or shared.get("DerivationImageSequence")
        uid = fallback
        if derivation and derivation[0].get("SourceImageSequence"):
            uid = str(derivation[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        out.append(uid)
    return out


def largest_slice(seg: pydicom.Dataset) -> Slice:
    """The source image with the most segmented pixels, and each segment's
    mask on it. Raises PreviewError when no frame names its source."""
    from pipelines.common.seg_frames import segment_frame_numbers, segmentation_frames

    frames = segmentation_frames(seg) > 0
    sources = frame_sources(seg)
    numbers = {
        frame - 1: int(item.SegmentNumber)
        for item in seg.SegmentSequence
        for frame in segment_frame_numbers(seg, int(item.SegmentNumber))
    }
    area: dict[str, int] = {}
    for index, uid in enumerate(sources):
        if uid is not None:
            area[uid] = area.get(uid, 0) + int(frames[index].sum())
    if not area:
        raise PreviewError("the SEG names no source image for its frames (Derivation Image Sequence)")
    best = max(area, key=lambda uid: (area[uid], -sources.index(uid)))
    masks: dict[int, np.ndarray] = {}
    for index, uid in enumerate(sources):
        if uid == best and index in numbers:
            number = numbers[index]
            masks[number] = masks.get(number, np.zeros(frames.shape[1:], bool)) | frames[index]
    return Slice(best, masks)


def segment_colours(seg: pydicom.Dataset) -> dict[int, tuple[int, int, int]]:
    """Segment number -> sRGB (0-255) from Recommended Display CIELab Value
    (PS3.3 C.10.7.1.1: L* 0..100, a* b* -128..127 scaled to 0..65535)."""
    from skimage.color import lab2rgb

    out = {}
    for i, item in enumerate(seg.SegmentSequence):
        value = item.get("RecommendedDisplayCIELabValue")
        if value is not None and len(value) == 3:
            lab = np.array([[[value[0] * 100 / 65535, value[1] * 255 / 65535 - 128, value[2] * 255 / 65535 - 128]]])
            r, g, b = (int(round(c * 255)) for c in np.clip(lab2rgb(lab)[0, 0], 0, 1))
            out[int(item.SegmentNumber)] = (r, g, b)
        else:
            out[int(item.SegmentNumber)] = FALLBACK_RGB[i % len(FALLBACK_RGB)]
    return out


def display_pixels(source: pydicom.Dataset) -> np.ndarray:
    """The source image as display grey values, float32 (Rows, Columns) in [0, 1]."""
    from pipelines.pneumonia.preprocess import dicom_to_image

    image = dicom_to_image(source).image
    if "VOILUTSequence" not in source and "WindowCenter" not in source:
        low, high = np.percentile(image, (1.0, 99.5))
        if high > low:
            image = np.clip((image - low) / (high - low), 0.0, 1.0)
    return image


def render(seg: pydicom.Dataset, read_source: Callable[[str], pydicom.Dataset]) -> bytes:
    """The PNG of ``seg``'s largest slice over its source image.

    ``read_source(sop_instance_uid)`` returns the source dataset with pixels.
    Raises PreviewError (no source stated or found) or ValueError (pixels
    that cannot be decoded, a SEG whose frames differ from the source's size).
    """
    chosen = largest_slice(seg)
    grey = display_pixels(read_source(chosen.source_uid))
    rows, cols = grey.shape
    if any(mask.shape != grey.shape for mask in chosen.masks.values()):
        raise ValueError(f"SEG frames are not {rows} x {cols}, the size of source {chosen.source_uid}")
    scale = min(MAX_SIDE / max(rows, cols), max(1.0, MIN_SIDE / max(rows, cols)))
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    base = Image.fromarray((grey * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    rgb = np.asarray(base.convert("RGB"), dtype=np.float32)
    colours = segment_colours(seg)
    fill = len(chosen.masks) > 1
    thick = max(1, round(min(size) / 256))
    for number, mask in sorted(chosen.masks.items()):
        shown = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
        if not shown.any():
            continue
        colour = np.array(colours.get(number, FALLBACK_RGB[0]), np.float32)
        if fill:
            rgb[shown] = rgb[shown] * (1 - FILL_ALPHA) + colour * FILL_ALPHA
        outline = ndimage.binary_dilation(shown, iterations=thick) & ~ndimage.binary_erosion(shown, iterations=thick)
        rgb[outline] = colour
    out = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(out, format="PNG", optimize=True)
    return out.getvalue()


class Previews:
    """Rendered previews in memory, by SEG SOP Instance UID (at most ``size``).

    ``source_paths(uids)`` maps SOP Instance UIDs to spool paths (the
    index's :meth:`~node.index.dashboard.DashboardQueries.instance_paths`).
    """

    def __init__(self, source_paths: Callable[[list[str]], Mapping[str, str]], size: int = 64):
        self.source_paths = source_paths
        self.size = size
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def png(self, seg_uid: str, seg_path: str | Path) -> bytes:
        """The preview of the SEG at ``seg_path``; PreviewError if it cannot be drawn."""
        with self._lock:
            if seg_uid in self._items:
                self._items.move_to_end(seg_uid)
                return self._items[seg_uid]
        try:
            seg = pydicom.dcmread(seg_path)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise PreviewError(f"the SEG {seg_path} cannot be read: {exc}") from exc
        try:
            data = render(seg, self._read_source)
        except (ValueError, AttributeError, KeyError) as exc:
            raise PreviewError(f"the SEG {seg_uid} cannot be drawn: {exc}") from exc
        with self._lock:
            self._items[seg_uid] = data
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return data

    def _read_source(self, uid: str) -> pydicom.Dataset:
        path = self.source_paths([uid]).get(uid)
        if path is None:
            raise PreviewError(f"source image {uid} is not in the index (purged by retention?)")
        try:
            return pydicom.dcmread(path)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise PreviewError(f"source image {uid} cannot be read from {path}: {exc}") from exc
