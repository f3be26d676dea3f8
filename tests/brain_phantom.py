"""A small four-sequence brain MR phantom with a tumour, as DICOM series.

The anatomy is defined analytically in patient space (LPS, mm), so every
series samples the same patient wherever its grid lies; the tumour follows
the BraTS label scheme (Menze et al. 2015): 1 = necrotic core (NCR),
2 = peritumoural oedema (ED), 4 = enhancing tumour (ET, a rim).

Tissue contrasts are the textbook ones (arbitrary units):

============  =====  =====  =====  =====
tissue        T1     T1c    T2     FLAIR
============  =====  =====  =====  =====
brain          600    600    450    500
CSF            200    200   1500    120
oedema         480    480   1100   1150   (bright on T2 and FLAIR)
ET rim         550   1300    800    900   (enhances after gadolinium)
NCR core       300    320   1400    650
skull bone      60     60     60     60
scalp (fat)   1000   1000    700    400
============  =====  =====  =====  =====

A smooth multiplicative bias field (+/-20 % along x) and Gaussian noise are
added; the volume is blurred by ~1 voxel (partial volume) and rounded to
int16. The series are written by the converter's own DICOM writer
(:func:`pipelines.brain_tumour.convert.image_to_series`), with its realistic
sequence attributes.

Variants: ``skull=True`` adds skull, scalp and a noise-filled background
(not skull-stripped, as from a scanner; otherwise the background is exactly
0 like BraTS data); ``missing="FLAIR"`` leaves a sequence out;
``flair_motion=True`` puts FLAIR on its own oblique grid (1.2 x 1.2 x 3 mm)
and moves the patient between T1c and FLAIR by a known rigid motion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset

from pipelines.base import Study
from pipelines.brain_tumour.convert import SEQUENCE_PROTOCOLS, image_to_series, study_info, write_series
from pipelines.brain_tumour.settings import ROLES
from pipelines.common.uids import derived_uid

# Tissue codes of the label volume the renderer fills before mapping to BraTS labels.
BACKGROUND, BRAIN, CSF, OEDEMA, ET, NCR, BONE, SCALP = range(8)
_BRATS = {OEDEMA: 2, ET: 4, NCR: 1}
_CONTRAST = {  # role -> intensity per tissue code
    "T1": (0, 600, 200, 480, 550, 300, 60, 1000),
    "T1c": (0, 600, 200, 480, 1300, 320, 60, 1000),
    "T2": (0, 450, 1500, 1100, 800, 1400, 60, 700),
    "FLAIR": (0, 500, 120, 1150, 900, 650, 60, 400),
}

BRAIN_RADII = np.array([34.0, 40.0, 22.0])  # mm, semi-axes of the brain ellipsoid
TUMOUR_CENTRE = np.array([-14.0, -10.0, 2.0])  # mm, LPS (patient's right, anterior)
VENTRICLE = (np.array([8.0, 8.0, 4.0]), np.array([5.0, 9.0, 5.0]))


@dataclass(frozen=True)
class Grid:
    """A voxel grid: size ``(x, y, z)``, spacing mm, origin mm (LPS), direction (row-major 3x3)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)

    def points(self) -> np.ndarray:
        """Physical points of every voxel centre, numpy ``(z, y, x, 3)``."""
        k, j, i = np.meshgrid(*(np.arange(n) for n in self.size[::-1]), indexing="ij")
        idx = np.stack([i, j, k], axis=-1).astype(np.float64) * np.array(self.spacing)
        return np.array(self.origin) + idx @ np.array(self.direction, dtype=np.float64).reshape(3, 3).T

    def image(self, array_zyx: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(array_zyx)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(float(v) for v in self.direction))
        return img


def centred_grid(size: Sequence[int], spacing: Sequence[float], direction: Sequence[float] | None = None) -> Grid:
    """A grid whose field of view is centred on the patient origin (0, 0, 0)."""
    d = np.eye(3) if direction is None else np.array(direction, dtype=np.float64).reshape(3, 3)
    half = (np.array(size) - 1) / 2 * np.array(spacing)
    origin = -(d @ half)
    return Grid(
        tuple(int(n) for n in size), tuple(float(s) for s in spacing), tuple(float(v) for v in origin), tuple(d.ravel())
    )


def tissue_at(points: np.ndarray, *, skull: bool) -> np.ndarray:
    """Tissue code at physical points ``(..., 3)`` (LPS mm, patient frame)."""
    r_brain = np.sqrt((((points) / BRAIN_RADII) ** 2).sum(-1))
    tissue = np.zeros(points.shape[:-1], dtype=np.uint8)
    if skull:
        # Scaled shells: CSF gap, bone, scalp fat, each a few mm thick.
        r_head = np.sqrt(((points / (BRAIN_RADII + 8.0)) ** 2).sum(-1))
        r_bone = np.sqrt(((points / (BRAIN_RADII + 5.0)) ** 2).sum(-1))
        r_gap = np.sqrt(((points / (BRAIN_RADII + 2.0)) ** 2).sum(-1))
        tissue[r_head <= 1] = SCALP
        tissue[r_bone <= 1] = BONE
        tissue[r_gap <= 1] = CSF
    tissue[r_brain <= 1] = BRAIN
    c, r = VENTRICLE
    tissue[(((points - c) / r) ** 2).sum(-1) <= 1] = CSF
    d = points - TUMOUR_CENTRE
    oedema = ((d / np.array([17.0, 15.0, 12.0])) ** 2).sum(-1) <= 1
    tissue[oedema & (r_brain <= 1)] = OEDEMA
    dist = np.sqrt((d**2).sum(-1))
    tissue[dist <= 9.0] = ET
    tissue[dist <= 5.5] = NCR
    return tissue


def brats_labels(tissue: np.ndarray) -> np.ndarray:
    """BraTS labels (0, 1, 2, 4) from tissue codes."""
    out = np.zeros(tissue.shape, dtype=np.uint8)
    for code, label in _BRATS.items():
        out[tissue == code] = label
    return out


def _moved_points(points: np.ndarray, motion: sitk.Transform | None) -> np.ndarray:
    """Where the patient points seen at ``points`` were at the reference time."""
    if motion is None:
        return points
    # Euler3D: q = R (p - c) + c + t, so p = R^T (q - c - t) + c.
    r = np.array(motion.GetMatrix()).reshape(3, 3)
    c = np.array(motion.GetCenter())
    t = np.array(motion.GetTranslation())
    return (points - c - t) @ r + c


def image_grid(image: sitk.Image) -> Grid:
    """The :class:`Grid` of a SimpleITK image."""
    return Grid(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def labels_on(image: sitk.Image, motion: sitk.Transform | None = None, *, skull: bool = False) -> np.ndarray:
    """Ground-truth BraTS labels ``(z, y, x)`` uint8 on ``image``'s grid, for
    a series acquired with the patient moved by ``motion``."""
    return brats_labels(tissue_at(_moved_points(image_grid(image).points(), motion), skull=skull))


def render(
    role: str, grid: Grid, *, skull: bool, rng: np.random.Generator, motion: sitk.Transform | None = None
) -> np.ndarray:
    """int16 ``(z, y, x)`` image of sequence ``role`` on ``grid``.

    ``motion`` maps patient points at the reference time to where they are
    during this acquisition; the scanner sees ``tissue(motion^-1(q))``.
    """
    points = _moved_points(grid.points(), motion)
    tissue = tissue_at(points, skull=skull)
    values = np.array(_CONTRAST[role], dtype=np.float32)[tissue]
    # Bias field: smooth, +/-20 % across the head along x (Sled et al. 1998 describe such fields).
    values *= (1.0 + 0.2 * np.clip(points[..., 0] / 48.0, -1, 1)).astype(np.float32)
    img = sitk.SmoothingRecursiveGaussian(grid.image(values), 0.6 * min(grid.spacing))
    values = sitk.GetArrayFromImage(img)
    inside = tissue != BACKGROUND
    noise = rng.normal(0.0, 12.0, size=values.shape).astype(np.float32)
    if skull:
        values = np.abs(values + noise)  # magnitude image: Rician-like noise fills the air
    else:
        values = np.where(inside, np.maximum(values + noise, 1.0), 0.0)  # stripped: exact-zero background
    return np.round(values).astype(np.int16)


@dataclass(frozen=True)
class PhantomStudy:
    """A generated study.

    Attributes
    ----------
    study:
        :class:`pipelines.base.Study` with ``roles`` filled.
    datasets:
        role -> datasets in slice order (Instance Number order).
    images:
        role -> the rendered int16 ``sitk.Image`` the series were written from.
    labels:
        BraTS labels ``(z, y, x)`` uint8 on the T1c grid, slice ``k`` =
        ``datasets["T1c"][k]``.
    brain:
        bool ``(z, y, x)`` on the T1c grid: brain tissue incl. tumour and
        ventricles, without the skull.
    flair_motion:
        The rigid motion applied to FLAIR (maps T1c-time points to FLAIR-time
        points, the transform a registration of FLAIR to T1c should find), or
        ``None``.
    paths:
        role -> written files, when ``out_dir`` was given.
    """

    study: Study
    datasets: dict[str, list[Dataset]]
    images: dict[str, sitk.Image]
    labels: np.ndarray
    brain: np.ndarray
    flair_motion: sitk.Euler3DTransform | None
    paths: dict[str, tuple[Path, ...]]


def make_phantom(
    *,
    size: Sequence[int] = (64, 64, 40),
    spacing: float = 1.5,
    skull: bool = False,
    missing: Sequence[str] | str = (),
    flair_motion: bool = False,
    seed: int = 0,
    out_dir: Path | None = None,
    patient_id: str = "PHANTOM-001",
) -> PhantomStudy:
    """Generate the phantom study (well under a second)."""
    missing = (missing,) if isinstance(missing, str) else tuple(missing)
    rng = np.random.default_rng(seed)
    grid = centred_grid(size, (spacing,) * 3)
    study = study_info(
        patient_name="Phantom^Brain",
        patient_id=patient_id,
        uid_parts=[f"phantom size={tuple(size)} spacing={spacing} skull={skull} motion={flair_motion} seed={seed}"],
    )
    motion = None
    images: dict[str, sitk.Image] = {}
    for role in ROLES:
        if role in missing:
            continue
        g = grid
        m = None
        if role == "FLAIR" and flair_motion:
            # Own oblique grid (5 degrees about z), thick slices, different FOV.
            a = np.deg2rad(5.0)
            rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
            g = centred_grid((84, 84, 22), (1.2, 1.2, 3.0), rot.ravel())
            motion = sitk.Euler3DTransform()
            motion.SetCenter((0.0, 0.0, 0.0))
            motion.SetRotation(np.deg2rad(4.0), np.deg2rad(-3.0), np.deg2rad(2.0))
            motion.SetTranslation((3.0, -2.5, 2.0))
            m = motion
        images[role] = g.image(render(role, g, skull=skull, rng=rng, motion=m))
    datasets: dict[str, list[Dataset]] = {}
    paths: dict[str, tuple[Path, ...]] = {}
    for role, image in images.items():
        protocol = SEQUENCE_PROTOCOLS[role]
        series_uid = derived_uid(None, study.study_instance_uid, "series", role)
        datasets[role] = image_to_series(
            image,
            protocol,
            study,
            series_instance_uid=series_uid,
            derivation_description="Synthetic brain tumour phantom (tests/brain_phantom.py)",
        )
        if out_dir is not None:
            paths[role] = write_series(datasets[role], Path(out_dir) / f"{protocol.series_number:03d}_{role}")
    tissue = tissue_at(grid.points(), skull=skull)
    brain = np.isin(tissue, [BRAIN, OEDEMA, ET, NCR]) | (
        (tissue == CSF) & (((grid.points() / BRAIN_RADII) ** 2).sum(-1) <= 1)
    )
    return PhantomStudy(
        study=Study(
            study_instance_uid=study.study_instance_uid,
            series={ds[0].SeriesInstanceUID: ds for ds in datasets.values()},
            roles={role: ds[0].SeriesInstanceUID for role, ds in datasets.items()},
        ),
        datasets=datasets,
        images=images,
        labels=brats_labels(tissue),
        brain=brain,
        flair_motion=motion,
        paths=paths,
    )
