"""Reading a Segmentation's frames, and a compact variant without the empty ones.

The one place that decides whether a dataset is a Segmentation
(:func:`check_segmentation`) and that reads its frames: the pixels
(:func:`segmentation_frames`), the segment of each frame
(:func:`segment_frame_numbers`) and what each segment holds
(:func:`segment_voxel_counts`).

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
from typing import cast

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import pack_bits, unpack_bits
from pydicom.tag import Tag

__all__ = [
    "check_segmentation",
    "omit_empty_frames",
    "segment_frame_numbers",
    "segment_voxel_counts",
    "segmentation_frames",
]

_REFERENCED_SEGMENT_NUMBER = Tag(0x0062, 0x000B)


def check_segmentation(seg: object) -> None:
    """Check that ``seg`` is a Segmentation instance.

    A Segmentation is a dataset whose SOP Class UID is Segmentation Storage
    (1.2.840.10008.5.1.4.1.1.66.4) or Label Map Segmentation Storage
    (1.2.840.10008.5.1.4.1.1.66.7) (PS3.4 B.5; ``highdicom.seg.SOP_CLASS_UIDS``).

    Raises
    ------
    ValueError
        ``seg`` is not a :class:`pydicom.Dataset` of one of those SOP Classes.
    """
    if not isinstance(seg, Dataset) or seg.get("SOPClassUID") not in hd.seg.SOP_CLASS_UIDS:
        raise ValueError(
            "seg must be a Segmentation (SOP Class 1.2.840.10008.5.1.4.1.1.66.4, or .66.7 for a label map), "
            f"got SOP Class {seg.get('SOPClassUID') if isinstance(seg, Dataset) else type(seg).__name__!r}"
        )


def segmentation_frames(seg: Dataset) -> np.ndarray:
    """The frames of a BINARY or FRACTIONAL/LABELMAP SEG, ``(F, Rows, Columns)`` uint8.

    Raises
    ------
    ValueError
        ``seg`` is not a Segmentation (:func:`check_segmentation`), has no
        Segmentation Type, its Pixel Data is encapsulated (a compressed
        transfer syntax), or shorter than NumberOfFrames x Rows x Columns.
    """
    check_segmentation(seg)
    if "SegmentationType" not in seg:
        raise ValueError("SegmentationType of seg is absent (PS3.3 C.8.20.2, Type 1)")
    transfer_syntax = getattr(getattr(seg, "file_meta", None), "TransferSyntaxUID", None)
    if transfer_syntax is not None and transfer_syntax.is_encapsulated:
        raise ValueError(f"PixelData of seg is encapsulated ({transfer_syntax.name}); only native frames are read")
    n, rows, cols = int(seg.get("NumberOfFrames", 1)), int(seg.Rows), int(seg.Columns)
    count = n * rows * cols
    if seg.SegmentationType == "BINARY":
        pixels = cast(np.ndarray, unpack_bits(seg.PixelData, as_array=True))[:count]  # typed ndarray | bytes
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


def _frame_segment_numbers(seg: Dataset) -> list[int | None]:
    """Referenced Segment Number of each frame of ``seg`` (``None``: none).

    The Segment Identification Sequence is read from each frame's item of
    the Per-Frame Functional Groups, or from the Shared Functional Groups
    where highdicom puts it for a single-frame SEG (PS3.3 C.7.6.16).
    """
    shared = seg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    shared_identification = shared.get("SegmentIdentificationSequence")
    per_frame = seg.get("PerFrameFunctionalGroupsSequence", [])
    numbers: list[int | None] = []
    for index in range(int(seg.get("NumberOfFrames", 1))):
        item = per_frame[index] if len(per_frame) > index else Dataset()
        identification = item.get("SegmentIdentificationSequence") or shared_identification
        numbers.append(int(identification[0].ReferencedSegmentNumber) if identification else None)
    return numbers


def segment_frame_numbers(seg: Dataset, segment_number: int) -> list[int]:
    """1-based numbers of the frames of ``seg`` that hold ``segment_number``
    (Segment Identification, PS3.3 C.8.20.3.1)."""
    return [frame for frame, number in enumerate(_frame_segment_numbers(seg), start=1) if number == segment_number]


def segment_voxel_counts(seg: Dataset) -> dict[int, int]:
    """How many pixels of each segment a BINARY Segmentation holds.

    Counts the set pixels of every frame (PS3.3 C.8.20.2: BINARY frames are
    1 bit per pixel) and adds them up by the frame's Referenced Segment
    Number (Segment Identification, C.8.20.3.1). For a SEG on a stack of
    parallel planes the count times the voxel volume is the segment's
    volume. A segment described in the Segment Sequence but on no frame (an
    empty segment with empty frames omitted) counts 0.

    Returns
    -------
    dict[int, int]
        Segment Number -> number of set pixels, for every described segment.

    Raises
    ------
    ValueError
        ``seg`` is not a Segmentation, not BINARY, has a frame without a
        segment or with a segment that is not described, or its frames
        cannot be read (:func:`segmentation_frames`).
    """
    check_segmentation(seg)
    if seg.get("SegmentationType") != "BINARY":
        raise ValueError(f"SegmentationType of seg is {seg.get('SegmentationType')!r}; voxel counts need BINARY")
    counts = {int(item.SegmentNumber): 0 for item in seg.get("SegmentSequence", [])}
    frame_segments = _frame_segment_numbers(seg)
    pixels = segmentation_frames(seg).reshape(len(frame_segments), -1)
    set_per_frame = np.count_nonzero(pixels, axis=1)
    for frame, (number, set_pixels) in enumerate(zip(frame_segments, set_per_frame, strict=True), start=1):
        if number not in counts:
            raise ValueError(f"frame {frame} of seg names segment {number}, which SegmentSequence does not describe")
        counts[number] += int(set_pixels)
    return counts
