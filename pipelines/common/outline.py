"""Closed SCOORD polylines on a source image (TID 1410 Image Region), for
planar results: the outline of a mask's largest region
(:func:`region_outline`) or of the whole image (:func:`image_outline`).
PS3.3 Table C.18.6-1 gives the coordinate system.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage import measure

__all__ = ["image_outline", "region_outline"]

def region_outline(mask: np.ndarray, *, tolerance: float = 0.5) -> tuple[np.ndarray, int]:
    """Outline of the largest region of a planar mask, as SCOORD Graphic Data.

    The region is the largest 4-connected component of ``mask`` (ties: the
    first in row-major order) with its holes filled; its boundary is traced
    with ``skimage.measure.find_contours`` at level 0.5 (on the mask padded
    by one pixel, so a region touching the image edge closes along it) and
    simplified by Douglas-Peucker (``skimage.measure.approximate_polygon``)
    within ``tolerance`` pixels.

    Coordinates follow PS3.3 Table C.18.6-1 (Graphic Data): (column, row)
    pairs, column first, with 0.0\\0.0 the top left corner of the top left
    pixel and Columns\\Rows the bottom right corner of the bottom right
    pixel, so the centre of pixel ``mask[r, c]`` is ``(c + 0.5, r + 0.5)``.
    The last point repeats the first: a closed POLYLINE (C.18.6.1.1). The
    traced boundary passes half way between the centres of region and
    background pixels, so every region pixel's centre is inside it.

    Parameters
    ----------
    mask:
        ``bool`` array of shape ``(Rows, Columns)``.
    tolerance:
        Largest distance, in pixels, of the simplified outline from the
        traced one; 0 keeps every vertex.

    Returns
    -------
    outline, regions:
        ``float32`` array of shape ``(n, 2)``, ``n >= 4``, of (column, row)
        points with ``outline[0] == outline[-1]``; and how many 4-connected
        regions ``mask`` has (the outline is of one of them).

    Raises
    ------
    TypeError
        ``mask`` is not a boolean ``numpy.ndarray``.
    ValueError
        ``mask`` is not 2-D, or has no pixel set; ``tolerance`` is negative.
    """
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise TypeError("mask must be a numpy.ndarray of dtype bool")
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (Rows, Columns), got shape {mask.shape}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0 pixels, got {tolerance}")
    labels, regions = ndimage.label(mask)  # default structure: 4-connected
    if regions == 0:
        raise ValueError("mask has no pixel set: there is no region to outline")
    sizes = np.bincount(labels.ravel())[1:]
    region = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    padded = np.pad(region, 1).astype(np.uint8)
    # fully_connected="low": background pixels touching only at a corner are
    # joined, so the foreground is traced 4-connected, as it was labelled.
    contours = measure.find_contours(padded, 0.5, fully_connected="low")
    # One closed contour: the region is 4-connected and has no holes.
    (contour,) = contours
    if tolerance > 0:
        contour = measure.approximate_polygon(contour, tolerance)
    # (padded row, padded column) -> (column, row): the padding shifts by one
    # pixel, the pixel centre is half a pixel from its corner.
    outline = np.column_stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5]).astype(np.float32)
    if not np.array_equal(outline[0], outline[-1]):
        outline = np.vstack([outline, outline[:1]])
    return outline, regions


def image_outline(rows: int, columns: int) -> np.ndarray:
    """The border of a whole ``rows`` x ``columns`` image as a closed POLYLINE
    in SCOORD coordinates (PS3.3 Table C.18.6-1: (column, row), from the top
    left corner 0\\0 to the bottom right corner Columns\\Rows).

    Returns
    -------
    numpy.ndarray
        ``float32``, shape ``(5, 2)``, clockwise on screen from the top left
        corner, last point = first.

    Raises
    ------
    ValueError
        ``rows`` or ``columns`` is not a positive integer.
    """
    for name, value in (("rows", rows), ("columns", columns)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    c, r = float(columns), float(rows)
    return np.array([[0, 0], [c, 0], [c, r], [0, r], [0, 0]], dtype=np.float32)
