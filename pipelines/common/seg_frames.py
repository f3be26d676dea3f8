"""A compact variant of a Segmentation: the same SEG without its empty frames.

By default the node writes one frame per source slice and segment
(``omit_empty_frames=False``): older OHIF releases mis-registered SEGs whose
empty frames were omitted (monai-deploy-app-sdk #397, highdicom #214). Weasis,
on the other hand, refuses SEGs of more than 400 frames (Weasis #680), and a
155-slice study with 3 segments has 465. So a destination can ask for the
compact variant (``omit_empty_frames = true``), and the node derives it from
the full SEG here, without the model or the source images: the frames that
remain keep their Per-frame Functional Groups (position, segment number,
derivation) untouched, so their geometry is exactly the full SEG's.

PS3.3 C.8.20.2: Segmentation Image Module; A.51.5.1: every frame of a SEG
references its segment and source image through its functional groups, so
dropping whole frames leaves a valid SEG.
"""

from __future__ import annotations

import copy

import numpy as np
from pydicom import Dataset
from pydicom.pixels import pack_bits, unpack_bits
from pydicom.multival import MultiValue
from pydicom.tag import Tag

_REFERENCED_SEGMENT_NUMBER = Tag(0x0062, 0x000B)



def segmentation_frames(seg: Dataset) -> np.ndarray:
    """The frames of a BINARY or FRACTIONAL/LABELMAP SEG, ``(F, Rows, Columns)`` uint8.

    Raises
    ------
    ValueError
        ``seg`` is not a Segmentation, or its Pixel Data is shorter than
        NumberOfFrames x Rows x Columns.
    """
    if seg.get("Modality") != "SEG" or "SegmentationType" not in seg:
        raise ValueError("Modality/SegmentationType: not a Segmentation")
    n, rows, cols = int(seg.get("NumberOfFrames", 1)), int(seg.Rows), int(seg.Columns)
    count = n * rows * cols
    if seg.SegmentationType == "BINARY":
        pixels = unpack_bits(seg.PixelData, as_array=True)[:count]
    else:
        pixels = np.frombuffer(seg.PixelData, dtype=np.uint8)[:count]
    if pixels.size != count:
        raise ValueError(f"PixelData holds {pixels.size} pixels, NumberOfFrames x Rows x Columns is {count}")
    return pixels.reshape(n, rows, cols)


def omit_empty_frames(seg: Dataset) -> Dataset | None:
    """The same Segmentation without its all-zero frames, or None when it has
    none to drop.

    The variant keeps the SOP Instance UID: it is the same segmentation,
    encoded for a destination that cannot take the full form, and a
    destination receives one or the other, never both. The SR references the
    SEG by SOP Instance UID and segment number (not frame number), so the
    reference holds at either destination. A SEG whose every frame is empty
    keeps its first frame: a SEG needs one.

    Raises
    ------
    ValueError
        As :func:`segmentation_frames`.
    """
    frames = segmentation_frames(seg)
    keep = [i for i in range(frames.shape[0]) if frames[i].any()] or [0]
    if len(keep) == frames.shape[0]:
        return None
    compact = copy.deepcopy(seg)
    compact.PerFrameFunctionalGroupsSequence = [compact.PerFrameFunctionalGroupsSequence[i] for i in keep]
    compact.NumberOfFrames = len(keep)
    _renumber_dimension_indices(compact)
    kept = frames[keep]
    if seg.SegmentationType == "BINARY":
        compact.PixelData = pack_bits(kept.ravel())  # pads to an even length
    else:
        data = kept.tobytes()
        compact.PixelData = data + b"\0" * (len(data) % 2)
    return compact


def _renumber_dimension_indices(seg: Dataset) -> None:
    """Make each Dimension Index Value dense again over the frames kept
    (PS3.3 C.7.6.17.1), as highdicom does when it omits empty frames
    itself; the segment-number dimension keeps the segment numbers."""
    pointers = [item.DimensionIndexPointer for item in seg.get("DimensionIndexSequence", [])]
    contents = [f.FrameContentSequence[0] for f in seg.PerFrameFunctionalGroupsSequence]

    def values_of(content) -> list[int]:  # VM 1 reads as an int, VM > 1 as a list
        v = content.DimensionIndexValues
        return [int(x) for x in v] if isinstance(v, list | tuple | MultiValue) else [int(v)]

    table = [values_of(c) for c in contents]
    for k, pointer in enumerate(pointers):
        if pointer == _REFERENCED_SEGMENT_NUMBER:
            continue
        dense = {value: i + 1 for i, value in enumerate(sorted({row[k] for row in table}))}
        for row in table:
            row[k] = dense[row[k]]
    for content, row in zip(contents, table, strict=True):
        content.DimensionIndexValues = row if len(row) > 1 else row[0]
