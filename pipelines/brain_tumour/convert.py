"""BraTS-style NIfTI case -> a four-series DICOM MR study (``ainode tools nifti-to-dicom``).

BraTS cases are distributed as NIfTI volumes, not DICOM. To send one to the
node as a modality would, each sequence becomes one MR Image Storage series
(PS3.3 A.4) of one study, with the attributes a rule-based sequence
identification reads (Series Description, Protocol Name, Scanning Sequence,
Sequence Variant, Repetition/Echo/Inversion Time, Contrast/Bolus Agent on
the post-contrast T1 only) and Image Plane geometry derived from the NIfTI
affine.

Geometry. NIfTI's affine maps voxel indices to RAS+ mm; DICOM patient space
is LPS+ (PS3.3 C.7.6.2.1.1). SimpleITK's NIfTI reader already converts the
affine to LPS (origin and direction with x and y negated), so the DICOM
attributes are read off the SimpleITK image:

- Image Orientation (Patient) = the image's x and y direction vectors (the
  columns of ``GetDirection()`` as a 3x3 matrix), i.e. the DICOM row and
  column directions;
- Image Position (Patient) of slice ``k`` = origin + ``k * spacing_z *
  direction_z``, the centre of the slice's first voxel;
- Pixel Spacing = ``(spacing_y, spacing_x)`` (row spacing first, PS3.3
  10.7.1.3); Slice Thickness = Spacing Between Slices = ``spacing_z``.

By default the volume is first reoriented to LPS (``sitk.DICOMOrient``, a
lossless permutation/flip), so an axial case is written as a scanner writes
axial slices: Image Orientation ``1\\0\\0\\0\\1\\0`` (column index towards
the patient's left, row index towards posterior), slices from feet to head.

Pixel data are int16 (MONOCHROME2, Pixel Representation 1). Integer volumes
that fit int16 (all BraTS releases) are stored exactly; other volumes are
scaled into int16 and carry Rescale Slope/Intercept.

UIDs are derived (SHA-512 via ``pydicom.uid.generate_uid``, see
:func:`pipelines.common.uids.derived_uid`) from the SHA-256 of the input
files and the patient ID, so converting the same files again gives the same
study, series and instance UIDs, and a PACS replaces instead of duplicating.

Sources: BraTS 2023 file names ``*-t1n``, ``*-t1c``, ``*-t2w``, ``*-t2f``
(Baid et al. 2021, arXiv:2107.02314; Karargyris et al. 2023); BraTS 2020 /
TCGA names ``*_t1``, ``*_t1ce``/``*_t1c``, ``*_t2``, ``*_flair``/``*_fla``
(Menze et al. 2015; Bakas et al. 2017).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage

from pipelines.brain_tumour.settings import ROLES
from pipelines.common.uids import derived_uid

__all__ = [
    "SequenceProtocol",
    "SEQUENCE_PROTOCOLS",
    "StudyInfo",
    "ConvertedSeries",
    "ConvertedStudy",
    "find_case_files",
    "to_int16",
    "image_to_series",
    "write_series",
    "study_info",
    "nifti_to_dicom",
]

_INT16 = np.iinfo(np.int16)


@dataclass(frozen=True)
class SequenceProtocol:
    """Acquisition attributes of one MR sequence (MR Image module, PS3.3
    C.8.3.1; Contrast/Bolus module, C.7.6.4), with values typical of a 3 T
    brain tumour protocol. Times in ms, flip angle in degrees.
    """

    role: str
    series_number: int
    series_description: str
    protocol_name: str
    sequence_name: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    mr_acquisition_type: str
    repetition_time: float
    echo_time: float
    inversion_time: float | None
    flip_angle: float
    echo_train_length: int
    contrast: bool = False


#: The four sequences of a BraTS study, in the order a scanner acquires them
#: (post-contrast T1 last). MPRAGE: GR/IR, magnetisation prepared; T2: turbo
#: spin echo; FLAIR: inversion-recovery TSE with TI nulling CSF.
SEQUENCE_PROTOCOLS: Mapping[str, SequenceProtocol] = {
    "T1": SequenceProtocol(
        "T1", 2, "AX T1 MPRAGE", "t1_mprage_ax", "*tfl3d1_16ns",
        ("GR", "IR"), ("SK", "SP", "MP"), (), "3D", 2300.0, 2.98, 900.0, 9.0, 1,
    ),
    "T2": SequenceProtocol(
        "T2", 3, "AX T2 TSE", "t2_tse_ax", "*tse2d1_18",
        ("SE",), ("SK", "SP", "OSP"), ("PFP",), "2D", 6000.0, 100.0, None, 150.0, 18,
    ),
    "FLAIR": SequenceProtocol(
        "FLAIR", 4, "AX T2 FLAIR", "t2_tirm_ax_dark-fluid", "*tir2d1_16",
        ("SE", "IR"), ("SK", "SP", "MP", "OSP"), ("PFP",), "2D", 9000.0, 81.0, 2500.0, 150.0, 16,
    ),
    "T1c": SequenceProtocol(
        "T1c", 5, "AX T1 MPRAGE POST GD", "t1_mprage_ax_post_gd", "*tfl3d1_16ns",
        ("GR", "IR"), ("SK", "SP", "MP"), (), "3D", 2300.0, 2.98, 900.0, 9.0, 1, contrast=True,
    ),
}


@dataclass(frozen=True)
class StudyInfo:
    """Patient and study attributes shared by every series of a converted study.

    Dates are DA (``YYYYMMDD``), times TM (``HHMMSS``). The patient is
    synthetic: the caller passes a name and ID that identify nobody.
    """

    patient_name: str
    patient_id: str
    study_instance_uid: str
    frame_of_reference_uid: str
    study_date: str = "20000101"
    study_time: str = "120000"
    accession_number: str = ""
    study_id: str = "1"
    study_description: str = "MR BRAIN WITH AND WITHOUT CONTRAST"
    patient_birth_date: str = ""
    patient_sex: str = ""
    institution_name: str = ""


@dataclass(frozen=True)
class ConvertedSeries:
    """One written series: its role, Series Instance UID and files in slice order."""

    role: str
    series_instance_uid: str
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class ConvertedStudy:
    """What :func:`nifti_to_dicom` wrote."""

    study_instance_uid: str
    series: Mapping[str, ConvertedSeries]
    sources: Mapping[str, Path] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        """Every file written, series by series."""
        return [p for s in self.series.values() for p in s.paths]


# --------------------------------------------------------------------------- input files

_SUFFIX = re.compile(r"[-_](t1n|t1ce|t1c|t1|t2w|t2f|t2|flair|fla)$", re.IGNORECASE)
_SUFFIX_ROLE = {
    "t1n": "T1", "t1": "T1",
    "t1c": "T1c", "t1ce": "T1c",
    "t2w": "T2", "t2": "T2",
    "t2f": "FLAIR", "fla": "FLAIR", "flair": "FLAIR",
}


def _stem(path: Path) -> str | None:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return None


def find_case_files(folder: Path | str, roles: Sequence[str] = ROLES) -> dict[str, Path]:
    """The NIfTI file of each sequence role in a BraTS-style case folder.

    Recognised names (case-insensitive, ``.nii.gz`` or ``.nii``): BraTS 2023
    ``<case>-t1n``, ``-t1c``, ``-t2w``, ``-t2f``; BraTS 2020 / TCGA
    ``<case>_t1``, ``_t1ce`` or ``_t1c``, ``_t2``, ``_flair`` or ``_fla``.
    Other files (``*_seg*``, labels) are ignored.

    Returns
    -------
    role (``"T1"``, ``"T1c"``, ``"T2"``, ``"FLAIR"``) -> path, for ``roles``.

    Raises
    ------
    ValueError
        ``folder`` is not a directory; a role has no file (naming the role and
        the accepted suffixes); a role matches two files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"case folder {folder} is not a directory")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        stem = _stem(path)
        if stem is None:
            continue
        m = _SUFFIX.search(stem)
        if m:
            found.setdefault(_SUFFIX_ROLE[m.group(1).lower()], []).append(path)
    out = {}
    for role in roles:
        paths = found.get(role, [])
        if not paths:
            accepted = sorted(k for k, v in _SUFFIX_ROLE.items() if v == role)
            raise ValueError(
                f"no {role} volume in {folder}: expected a .nii.gz/.nii file ending in one of "
                + ", ".join(f"-{a}/_{a}" for a in accepted)
            )
        if len(paths) > 1:
            raise ValueError(f"{role}: several files in {folder} match: {[p.name for p in paths]}")
        out[role] = paths[0]
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- pixel values


def to_int16(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored int16 values for an intensity array.

    Returns
    -------
    ``(stored, slope, intercept)`` with ``stored`` int16 of ``array``'s shape
    and ``array ~= stored * slope + intercept``. Integer-valued arrays within
    the int16 range are stored exactly (slope 1, intercept 0); others are
    scaled linearly onto [-32767, 32767] or [0, 32767].

    Raises
    ------
    ValueError
        ``array`` holds NaN or infinite values.
    """
    if array.dtype.kind in "iub":
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if _INT16.min <= low and high <= _INT16.max:
            return array.astype(np.int16), 1.0, 0.0
    else:
        if not np.all(np.isfinite(array)):
            raise ValueError("pixel values: the volume holds NaN or infinite values")
        integral = array.size and np.array_equal(array, np.round(array))
        if integral and array.min() >= _INT16.min and array.max() <= _INT16.max:
            return array.astype(np.int16), 1.0, 0.0
    lo, hi = float(array.min()), float(array.max())
    # Keep 0 at 0 (background stays background) and use the whole range.
    top = max(abs(lo), abs(hi)) or 1.0
    slope = top / float(_INT16.max)
    stored = np.round(array.astype(np.float64) / slope).astype(np.int16)
    return stored, slope, 0.0


def _window(stored: np.ndarray, slope: float, intercept: float) -> tuple[float, float]:
    """Window Center/Width (PS3.3 C.11.2) spanning the 0.5-99.5 percentiles of
    the non-zero voxels, in rescaled units."""
    sample = stored.ravel()[:: max(1, stored.size // 2_000_000)]
    sample = sample[sample != 0]
    if sample.size == 0:
        return 0.5, 1.0
    lo, hi = np.percentile(sample, [0.5, 99.5]) * slope + intercept
    width = max(float(hi - lo), 1.0)
    return float((hi + lo) / 2), width


# --------------------------------------------------------------------------- datasets


def _ds_number(value: float) -> str:
    """A DS string (<= 16 characters, PS3.5 6.2) for ``value``."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.6e}"
    return text


def study_info(
    *,
    patient_name: str,
    patient_id: str,
    uid_parts: Iterable[str],
    uid_prefix: str | None = None,
    **attributes,
) -> StudyInfo:
    """A :class:`StudyInfo` whose Study Instance and Frame of Reference UIDs
    are derived from ``patient_id`` and ``uid_parts`` (e.g. input file hashes).

    ``attributes`` are further :class:`StudyInfo` fields (study_date, ...).
    """
    parts = ("nifti-to-dicom", patient_id, *uid_parts)
    study_uid = derived_uid(uid_prefix, *parts, "study")
    return StudyInfo(
        patient_name=patient_name,
        patient_id=patient_id,
        study_instance_uid=study_uid,
        frame_of_reference_uid=derived_uid(uid_prefix, study_uid, "frame-of-reference"),
        **attributes,
    )


def _series_time(study_time: str, minutes: int) -> str:
    h, m, s = int(study_time[0:2]), int(study_time[2:4]), int(study_time[4:6] or 0)
    total = (h * 60 + m + minutes) % (24 * 60)
    return f"{total // 60:02d}{total % 60:02d}{s:02d}"


def image_to_series(
    image: sitk.Image,
    protocol: SequenceProtocol,
    study: StudyInfo,
    *,
    series_instance_uid: str,
    uid_prefix: str | None = None,
    derivation_description: str | None = None,
    image_type: tuple[str, ...] = ("DERIVED", "PRIMARY", "OTHER"),
    # Not the node's own "dicom-ai-node": Orthanc's autoroute.lua never sends
    # that Manufacturer's series (the node's results) to the node.
    manufacturer: str = "dicom-ai-node nifti-to-dicom",
) -> list[Dataset]:
    """One MR Image Storage series, a single-frame instance per slice, from a 3-D image.

    Parameters
    ----------
    image:
        3-D ``sitk.Image`` in LPS patient space (as SimpleITK reads NIfTI):
        slice ``k`` of the series is image z index ``k``; its pixel rows are
        image y, columns image x (numpy ``GetArrayFromImage(image)[k]`` is the
        pixel array of instance ``k + 1``).
    protocol:
        Sequence attributes, e.g. ``SEQUENCE_PROTOCOLS["T1c"]``.
    study:
        Patient/study attributes and the shared UIDs.
    series_instance_uid:
        The series UID; SOP Instance UIDs are derived from it and the slice
        index, so they repeat when it does.
    derivation_description:
        Derivation Description (0008,2111), e.g. where the data came from.
    image_type:
        Image Type (0008,0008). Converted data are ``DERIVED``.

    Returns
    -------
    One dataset per slice, in slice order (Instance Number 1..n along the
    image z axis), each with ``file_meta`` (Explicit VR Little Endian) so it
    can be decoded in memory or saved with ``save_as(enforce_file_format=True)``.

    Raises
    ------
    ValueError
        ``image`` is not 3-D or not scalar; its z axis is not perpendicular to
        its x and y axes ("direction": a sheared affine has no DICOM form);
        it holds NaN/inf.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"image must be a 3-D scalar image, got dimension {image.GetDimension()} with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    row, col, axis = direction[:, 0], direction[:, 1], direction[:, 2]
    if abs(row @ axis) > 1e-4 or abs(col @ axis) > 1e-4 or abs(row @ col) > 1e-4:
        raise ValueError(f"direction {direction.ravel().tolist()} is not orthogonal (sheared affine)")
    spacing = image.GetSpacing()
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    normal = np.cross(row, col)

    stored, slope, intercept = to_int16(sitk.GetArrayViewFromImage(image))
    center, width = _window(stored, slope, intercept)
    n_slices, rows, columns = stored.shape
    series_time = _series_time(study.study_time, 5 * protocol.series_number)

    out = []
    for k in range(n_slices):
        position = origin + k * spacing[2] * axis
        sop_uid = derived_uid(uid_prefix, series_instance_uid, "instance", str(k + 1))
        ds = Dataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta

        # SOP Common, General Image
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = list(image_type)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = study.study_date
        ds.SeriesDate = study.study_date
        ds.ContentDate = study.study_date
        ds.StudyTime = study.study_time
        ds.SeriesTime = series_time
        ds.ContentTime = series_time
        ds.AccessionNumber = study.accession_number
        ds.Modality = "MR"
        ds.Manufacturer = manufacturer
        ds.InstitutionName = study.institution_name
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study.study_description
        ds.SeriesDescription = protocol.series_description
        ds.ManufacturerModelName = "nifti-to-dicom"
        if derivation_description:
            ds.DerivationDescription = derivation_description[:1024]
        # Patient
        ds.PatientName = study.patient_name
        ds.PatientID = study.patient_id
        ds.PatientBirthDate = study.patient_birth_date
        ds.PatientSex = study.patient_sex
        # Contrast/Bolus (C.7.6.4): only the post-contrast series
        if protocol.contrast:
            ds.ContrastBolusAgent = "GADOBUTROL 1.0 MMOL/ML"
            ds.ContrastBolusRoute = "IV"
            ds.ContrastBolusVolume = "7.5"
            ds.ContrastBolusIngredient = "GADOLINIUM"
            ds.ContrastBolusIngredientConcentration = "1.0"
        # MR Image (C.8.3.1)
        ds.BodyPartExamined = "BRAIN"
        ds.ScanningSequence = list(protocol.scanning_sequence)
        ds.SequenceVariant = list(protocol.sequence_variant)
        ds.ScanOptions = list(protocol.scan_options)
        ds.MRAcquisitionType = protocol.mr_acquisition_type
        ds.SequenceName = protocol.sequence_name
        ds.AngioFlag = "N"
        ds.SliceThickness = _ds_number(spacing[2])
        ds.RepetitionTime = _ds_number(protocol.repetition_time)
        ds.EchoTime = _ds_number(protocol.echo_time)
        if protocol.inversion_time is not None:
            ds.InversionTime = _ds_number(protocol.inversion_time)
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = "123.2"
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = "1"
        ds.MagneticFieldStrength = "3"
        ds.SpacingBetweenSlices = _ds_number(spacing[2])
        ds.EchoTrainLength = str(protocol.echo_train_length)
        ds.FlipAngle = _ds_number(protocol.flip_angle)
        ds.PatientPosition = "HFS"
        ds.ProtocolName = protocol.protocol_name
        # General Study / Series, Frame of Reference
        ds.StudyInstanceUID = study.study_instance_uid
        ds.SeriesInstanceUID = series_instance_uid
        ds.StudyID = study.study_id
        ds.SeriesNumber = str(protocol.series_number)
        ds.AcquisitionNumber = "1"
        ds.InstanceNumber = str(k + 1)
        # Image Plane (C.7.6.2)
        ds.ImagePositionPatient = [_ds_number(v) for v in position]
        ds.ImageOrientationPatient = [_ds_number(v) for v in (*row, *col)]
        ds.FrameOfReferenceUID = study.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds_number(float(position @ normal))
        # Image Pixel (C.7.6.3)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelSpacing = [_ds_number(spacing[1]), _ds_number(spacing[0])]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleIntercept = _ds_number(intercept)
            ds.RescaleSlope = _ds_number(slope)
            ds.RescaleType = "US"
        ds.WindowCenter = _ds_number(center)
        ds.WindowWidth = _ds_number(width)
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<i2").tobytes()
        out.append(ds)
    return out


def write_series(datasets: Sequence[Dataset], folder: Path | str) -> tuple[Path, ...]:
    """Write datasets as PS3.10 files ``folder/IM0001.dcm``... (by Instance Number).

    Returns the paths in the order of ``datasets``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"IM{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return tuple(paths)


def nifti_to_dicom(
    case_dir: Path | str,
    out_dir: Path | str,
    *,
    patient_name: str,
    patient_id: str,
    uid_prefix: str | None = None,
    study_date: str = "20000101",
    study_time: str = "120000",
    accession_number: str = "",
    orientation: str | None = "LPS",
    roles: Sequence[str] = ROLES,
) -> ConvertedStudy:
    """Convert a BraTS-style NIfTI case into a DICOM MR study of four series.

    Parameters
    ----------
    case_dir:
        Folder with one NIfTI per sequence (see :func:`find_case_files`).
    out_dir:
        Where to write ``<SeriesNumber>_<role>/IM0001.dcm``...; created.
    patient_name, patient_id:
        A synthetic patient (Patient's Name is PN: ``"Family^Given"``).
    uid_prefix:
        Organisation UID root, or ``None`` for pydicom's.
    orientation:
        Reorient each volume to this SimpleITK/DICOMOrient code first (default
        ``"LPS"``: axial slices as a scanner writes them); ``None`` keeps the
        NIfTI storage order.
    roles:
        Which sequences to convert (default all four).

    Returns
    -------
    :class:`ConvertedStudy` with the study UID and the files per role.

    Raises
    ------
    ValueError
        A sequence is missing or ambiguous in ``case_dir``; a volume is not
        3-D, has a sheared affine or non-finite values.
    """
    files = find_case_files(case_dir, roles)
    digests = {role: _sha256(path) for role, path in files.items()}
    study = study_info(
        patient_name=patient_name,
        patient_id=patient_id,
        uid_parts=[f"{role}={digests[role]}" for role in sorted(digests)],
        uid_prefix=uid_prefix,
        study_date=study_date,
        study_time=study_time,
        accession_number=accession_number,
    )
    out_dir = Path(out_dir)
    series = {}
    for role in sorted(roles, key=lambda r: SEQUENCE_PROTOCOLS[r].series_number):
        image = sitk.ReadImage(str(files[role]))
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:
            image = image[:, :, :, 0]
        if orientation:
            image = sitk.DICOMOrient(image, orientation)
        protocol = SEQUENCE_PROTOCOLS[role]
        series_uid = derived_uid(uid_prefix, study.study_instance_uid, "series", role, digests[role])
        datasets = image_to_series(
            image,
            protocol,
            study,
            series_instance_uid=series_uid,
            uid_prefix=uid_prefix,
            derivation_description=(
                f"Converted by dicom-ai-node nifti-to-dicom from NIfTI {files[role].name} "
                f"(sha256 {digests[role][:16]}...); not acquired as DICOM"
            ),
        )
        paths = write_series(datasets, out_dir / f"{protocol.series_number:03d}_{role}")
        series[role] = ConvertedSeries(role, series_uid, paths)
        del datasets, image
    return ConvertedStudy(study.study_instance_uid, series, dict(files))
