"""Test helpers: validate derived DICOM objects the way a PACS and a viewer will.

- :func:`run_dciodvfy` writes a dataset as a Part 10 file and runs David
  Clunie's ``dciodvfy`` (Debian package ``dicom3tools``) on it. dciodvfy
  prints everything to stderr: one line per finding, ``Error - ...`` or
  ``Warning - ...`` (``Abort - ...`` when it cannot read the file), plus the
  name of the IOD it checked; it exits 1 when it found an error.
- :func:`read_seg` / :func:`read_sr` write a dataset to bytes and read it back
  with highdicom (``highdicom.seg.segread``, ``highdicom.sr.srread``), so a
  test checks what would go over the wire, not the object in memory.
- :func:`seg_mask_on_source`, :func:`measurement`, :func:`evaluation`: the
  content a test checks, looked up by code.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset, dcmwrite
from pydicom.sr.coding import Code

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


@dataclass(frozen=True)
class DciodvfyResult:
    """What dciodvfy said about one file.

    Attributes
    ----------
    errors:
        ``Error - ...`` and ``Abort - ...`` lines, prefix included.
    warnings:
        ``Warning - ...`` lines, prefix included.
    iod:
        The IOD dciodvfy checked against, e.g. ``"Segmentation"``.
    returncode:
        dciodvfy's exit status (0: no error).
    """

    errors: list[str]
    warnings: list[str]
    iod: str | None
    returncode: int


def run_dciodvfy(dataset: Dataset, directory: Path, *, name: str = "object.dcm") -> DciodvfyResult:
    """Write ``dataset`` to ``directory/name`` (PS3.10 file) and run dciodvfy on it.

    Raises
    ------
    FileNotFoundError
        dciodvfy is not installed.
    RuntimeError
        dciodvfy exited non-zero without printing an Error line (an output
        format this parser does not know).
    """
    if not Path(DCIODVFY).exists():
        raise FileNotFoundError(f"dciodvfy not found at {DCIODVFY}; install the Debian package dicom3tools")
    path = Path(directory) / name
    dcmwrite(path, dataset, enforce_file_format=True)
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120, check=False)
    # It writes to stderr; read stdout too in case a build differs.
    lines = [line.rstrip() for line in (done.stderr + "\n" + done.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("Error - ", "Abort - "))]
    warnings = [line for line in lines if line.startswith("Warning - ")]
    others = [line for line in lines if not line.startswith(("Error - ", "Abort - ", "Warning - "))]
    if done.returncode != 0 and not errors:
        raise RuntimeError(f"dciodvfy exited {done.returncode} without an Error line: {lines}")
    return DciodvfyResult(errors, warnings, others[0] if others else None, done.returncode)


def _round_trip(dataset: Dataset) -> BytesIO:
    buffer = BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def read_seg(dataset: Dataset) -> hd.seg.Segmentation:
    """Encode ``dataset`` and read it back with ``highdicom.seg.segread``."""
    return hd.seg.segread(_round_trip(dataset))


def read_sr(dataset: Dataset) -> hd.sr.Comprehensive3DSR:
    """Encode ``dataset`` and read it back with ``highdicom.sr.srread``."""
    return hd.sr.srread(_round_trip(dataset))


def seg_mask_on_source(seg: hd.seg.Segmentation, source: Dataset, segment_number: int = 1) -> np.ndarray:
    """The segment as a ``bool`` array ``(Rows, Columns)`` on the source's grid,
    found through the SEG's references to ``source`` (not by frame order)."""
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(source.SOPInstanceUID)],
        segment_numbers=[segment_number],
    )
    return pixels[0, :, :, 0].astype(bool)


def measurement(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code) -> hd.sr.Measurement:
    """The one measurement of ``group`` whose concept name is ``name``."""
    found = group.get_measurements(name=name)
    if len(found) != 1:
        raise AssertionError(f"expected one measurement {name.meaning!r}, found {len(found)}")
    return found[0]


def evaluation(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code) -> hd.sr.CodedConcept:
    """The coded value of the one qualitative evaluation named ``name``."""
    found = group.get_qualitative_evaluations(name=name)
    if len(found) != 1:
        raise AssertionError(f"expected one qualitative evaluation {name.meaning!r}, found {len(found)}")
    return found[0].value
