"""Build small MR studies for writer tests: valid MR Image Storage series.

:func:`mr_series` writes one series of single-frame MR images on a regular
grid (Patient, General Study, General Series, Frame of Reference, General
Equipment, General Image, Image Plane, Image Pixel, MR Image, SOP Common
modules, PS3.3 A.4), so that dciodvfy finds no error in the sources and any
error in a derived object is the writer's. :func:`mr_study` puts one series
per role (T1, T1c, T2, FLAIR) into one study and Frame of Reference, as
BraTS-style co-registered sequences are. :func:`enhanced_mr` converts a
series into one multi-frame image (highdicom's Legacy Converted Enhanced MR,
PS3.3 A.71), the form an enhanced MR reference takes. :func:`series_from_sitk`
writes the grid of a SimpleITK image (e.g. a BraTS NIfTI volume) as a series.

UIDs come from ``seed`` (``pydicom.uid.generate_uid(entropy_srcs=...)``): the
same arguments give the same study.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ROLES = ("T1", "T1c", "T2", "FLAIR")

# Series Description, Scanning Sequence, Sequence Variant, TR, TE, TI (ms):
# typical 1.5/3 T brain protocol values, only for realistic headers.
_PROTOCOL = {
    "T1": ("AX T1 SE", "SE", "NONE", 500.0, 10.0, None),
    "T1c": ("AX T1 SE +C", "SE", "NONE", 500.0, 10.0, None),
    "T2": ("AX T2 TSE", "SE", "SK", 4000.0, 100.0, None),
    "FLAIR": ("AX T2 FLAIR", "IR", "SK", 9000.0, 120.0, 2500.0),
}


def _uid(seed: str, *parts: object) -> str:
    return generate_uid(entropy_srcs=[seed, *map(str, parts)])


def mr_series(
    shape: tuple[int, int, int] = (24, 32, 32),
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
    *,
    role: str = "T1c",
    seed: str = "brain-write-test",
    series_number: int = 1,
    origin: Sequence[float] = (-16.0, -16.0, -24.0),
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    direction: Sequence[float] | None = None,
    pixels: np.ndarray | None = None,
) -> list[Dataset]:
    """Single-frame MR images of one series, in slice order.

    Parameters
    ----------
    shape:
        ``(slices, rows, columns)``.
    spacing:
        ``(between rows, between columns, between slices)`` in mm.
    role:
        One of :data:`ROLES`; sets the Series Description and MR parameters.
    seed:
        Derives every UID: the study, Frame of Reference and patient are
        shared by all series built with the same seed.
    series_number:
        Series Number (0020,0011).
    origin:
        Image Position (Patient) of the first slice, mm.
    orientation:
        Image Orientation (Patient).
    direction:
        Unit vector from one slice to the next; default row x column.
    pixels:
        ``uint16`` or ``int16`` array of ``shape``; default a gradient.
    """
    slices, rows, columns = shape
    description, scanning, variant, tr, te, ti = _PROTOCOL[role]
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    step = np.array(direction, float) if direction is not None else np.cross(row_dir, col_dir)
    if pixels is None:
        pixels = (np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns) % 1000)[None].repeat(slices, 0)
    if pixels.shape != shape:
        raise ValueError(f"pixels has shape {pixels.shape}, expected {shape}")
    signed = pixels.dtype == np.int16
    study = _uid(seed, "study")
    series = _uid(seed, "series", role)
    images = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = _uid(seed, "image", role, k)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "MR"
        ds.Manufacturer = "Phantom Scanner Co"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "MRI BRAIN W/WO CONTRAST"
        ds.SeriesDescription = description
        ds.PatientName = "Phantom^Brain"
        ds.PatientID = "PHANTOM-001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.PatientAge = "054Y"
        ds.BodyPartExamined = "BRAIN"
        ds.PatientPosition = "HFS"
        ds.ScanningSequence = scanning
        ds.SequenceVariant = variant
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = spacing[2]
        ds.RepetitionTime = tr
        ds.EchoTime = te
        if ti is not None:
            ds.InversionTime = ti
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 3.0
        ds.ImagedNucleus = "1H"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + k * spacing[2] * step]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.FrameOfReferenceUID = _uid(seed, "frame-of-reference")
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.WindowCenter = 500
        ds.WindowWidth = 1000
        ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()
        images.append(ds)
    return images


def mr_study(
    shape: tuple[int, int, int] = (24, 32, 32),
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
    *,
    seed: str = "brain-write-test",
    **kwargs: object,
) -> dict[str, list[Dataset]]:
    """One co-registered series per role of :data:`ROLES`: role -> images."""
    return {
        role: mr_series(shape, spacing, role=role, seed=seed, series_number=number, **kwargs)  # type: ignore[arg-type]
        for number, role in enumerate(ROLES, start=1)
    }


def enhanced_mr(series: Sequence[Dataset], *, seed: str = "brain-write-test") -> Dataset:
    """``series`` as one Legacy Converted Enhanced MR image (highdicom,
    PS3.3 A.71): frames in the series' order, geometry in functional groups."""
    import highdicom as hd

    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=list(series),
        series_instance_uid=_uid(seed, "enhanced-series"),
        series_number=90,
        sop_instance_uid=_uid(seed, "enhanced-image"),
        instance_number=1,
    )
    return image


def series_from_sitk(image, *, role: str = "T1c", seed: str = "brain-write-test") -> list[Dataset]:
    """The grid and voxels of a 3-D SimpleITK ``image`` as an MR series.

    SimpleITK holds geometry in LPS, as DICOM does: the index axis ``i``
    (columns) runs along direction column 0, ``j`` (rows) along column 1,
    ``k`` (slices) along column 2, so Image Orientation (Patient) is columns
    0 and 1 of the direction matrix and slice ``k`` lies at
    ``TransformIndexToPhysicalPoint((0, 0, k))``. Voxels are written as
    ``int16`` (BraTS volumes are ``int16``).
    """
    import SimpleITK as sitk

    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    return mr_series(
        tuple(array.shape),  # type: ignore[arg-type]
        (sy, sx, sz),
        role=role,
        seed=seed,
        origin=image.GetOrigin(),
        orientation=tuple(direction[:, 0]) + tuple(direction[:, 1]),
        direction=tuple(direction[:, 2]),
        pixels=np.clip(array, -32768, 32767).astype(np.int16),
    )
