"""Spool: durable files for received instances, refused instances and results.

Layout (docs/architecture.md, "State, and why nothing is lost")::

    spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm     received instances
    quarantine/<time>-<id>.dcm + .json                     refused instances and why
    outbox/<StudyUID>/<SOPInstanceUID>.dcm                 derived objects to deliver

Every file is written to a temporary name, fsynced, renamed into place and its
directory fsynced, so a file under its final name is always complete, even
after a power cut. Only then does the caller index it and answer the peer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import Dataset

# UIDs become path components: digits and dots only keeps '..' and '/' out.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# write_durable's temporary names: .<final name>.<uuid4 hex>.tmp
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


def is_safe_uid(value: object) -> bool:
    """True when ``value`` is a UID (PS3.5 9.1) usable as a file name: digits
    and dots, at most 64 characters. Leading zeros, invalid in the standard but
    seen in the wild, are accepted."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path, fsync: bool) -> None:
    """Create ``path`` and its missing parents, fsyncing each parent whose
    entry list changed so the new directory survives a power cut."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        if fsync:
            _fsync_dir(d.parent)


def write_durable(path: Path, data: bytes | Dataset, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync dir.

    ``data`` is either encoded bytes (a DICOM file as received) or a pydicom
    Dataset, saved in the DICOM File Format (PS3.10 7).

    Raises
    ------
    OSError
        The disk is full or not writable; nothing is left under ``path``.
    """
    _makedirs_durable(path.parent, fsync)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if isinstance(data, Dataset):
                data.save_as(fh, enforce_file_format=True)
            else:
                fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)
    return path


class Spool:
    """The node's files on disk.

    Parameters
    ----------
    spool_dir, quarantine_dir, outbox_dir:
        Directories, created when missing.
    fsync:
        Make each write durable before returning (default). Turning it off
        trades crash safety for speed and is meant for benchmarks only.
    """

    def __init__(self, spool_dir: Path, quarantine_dir: Path, outbox_dir: Path, *, fsync: bool = True):
        self.spool_dir = Path(spool_dir)
        self.quarantine_dir = Path(quarantine_dir)
        self.outbox_dir = Path(outbox_dir)
        self.fsync = fsync
        for d in (self.spool_dir, self.quarantine_dir, self.outbox_dir):
            _makedirs_durable(d.resolve(), fsync)

    # -- received instances -------------------------------------------------

    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives.

        Raises
        ------
        ValueError
            A UID is not digits and dots (it would escape the spool).
        """
        for name, uid in (
            ("StudyInstanceUID", study_uid),
            ("SeriesInstanceUID", series_uid),
            ("SOPInstanceUID", sop_instance_uid),
        ):
            if not is_safe_uid(uid):
                raise ValueError(f"{name} {uid!r} is not a valid UID")
        return self.spool_dir / study_uid / series_uid / f"{sop_instance_uid}.dcm"

    def store_instance(self, study_uid: str, series_uid: str, sop_instance_uid: str, encoded: bytes) -> Path:
        """Write a received instance, as the peer encoded it, durably.

        ``encoded`` is the whole DICOM file: preamble, file meta, dataset.
        """
        return write_durable(self.instance_path(study_uid, series_uid, sop_instance_uid), encoded, fsync=self.fsync)

    def temporary_path(self, label: str = "stow-part") -> Path:
        """A fresh temporary file name in the spool folder (``.<label>.<hex>.tmp``),
        on the spool's file system: where STOW-RS writes each part while it
        streams in. The caller deletes it; one a kill leaves behind is deleted
        at start-up (:meth:`remove_temporary_files`)."""
        return self.spool_dir / f".{label}.{uuid.uuid4().hex}.tmp"

    def iter_instances(self) -> Iterator[Path]:
        """Every instance file in the spool, for recovery after a crash."""
        for study in sorted(self.spool_dir.iterdir()):
            if not study.is_dir():
                continue
            for series in sorted(study.iterdir()):
                if series.is_dir():
                    yield from sorted(series.glob("*.dcm"))

    def remove_series(self, study_uid: str, series_uid: str) -> int:
        """Delete a series' files; returns how many were removed."""
        d = self.spool_dir / study_uid / series_uid
        if not (is_safe_uid(study_uid) and is_safe_uid(series_uid)) or not d.is_dir():
            return 0
        n = sum(1 for _ in d.glob("*.dcm"))
        shutil.rmtree(d)
        try:
            d.parent.rmdir()  # the study folder, once its last series is gone
        except OSError:
            pass
        return n

    def remove_temporary_files(self) -> tuple[int, int]:
        """Delete what :func:`write_durable` leaves when the process is killed
        between creating its temporary file and the rename
        (``.<name>.<hex>.tmp``, in the spool's series folders, the quarantine
        and the outbox). Only safe while nothing writes: the node calls it at
        start-up, before the SCP listens. Returns (files, bytes) removed."""
        files = size = 0
        for root in (self.spool_dir, self.quarantine_dir, self.outbox_dir):
            for folder, _, names in os.walk(root):
                for name in names:
                    if not _TEMPORARY.match(name):
                        continue
                    path = Path(folder) / name
                    try:
                        n = path.stat().st_size
                        path.unlink()
                    except FileNotFoundError:
                        continue
                    files, size = files + 1, size + n
        return files, size

    # -- refused instances ----------------------------------------------------

    def quarantine(self, encoded: bytes, reason: str, details: dict) -> Path:
        """Keep a refused instance aside with the reason, for an administrator.

        Writes ``<time>-<id>.dcm`` (the bytes as received) and ``.json``
        (reason, DIMSE status, peer, time). Returns the ``.dcm`` path.
        """
        stem = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:12]
        dcm = write_durable(self.quarantine_dir / f"{stem}.dcm", encoded, fsync=self.fsync)
        info = {"reason": reason, "quarantined_at": time.time(), **details}
        write_durable(
            self.quarantine_dir / f"{stem}.json",
            json.dumps(info, indent=2, default=str).encode(),
            fsync=self.fsync,
        )
        return dcm

    # -- results ----------------------------------------------------------------

    def outbox_path(self, study_uid: str, sop_instance_uid: str, variant: str = "") -> Path:
        if not (is_safe_uid(study_uid) and is_safe_uid(sop_instance_uid)):
            raise ValueError(f"result UIDs {study_uid!r}/{sop_instance_uid!r} are not valid UIDs")
        if variant and not variant.isalnum():
            raise ValueError(f"variant {variant!r}: letters and digits only")
        return self.outbox_dir / study_uid / f"{sop_instance_uid}{'.' + variant if variant else ''}.dcm"

    def store_result(self, ds: Dataset, variant: str = "") -> Path:
        """Write a derived object (SEG, SR) to the outbox before any send.
        ``variant`` names another encoding of the same object (e.g. a SEG
        without its empty frames), kept beside it."""
        return write_durable(self.outbox_path(ds.StudyInstanceUID, ds.SOPInstanceUID, variant), ds, fsync=self.fsync)


#: What the index records of an instance (receive step).
INDEX_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "InstanceNumber",
    "Modality",
    "SeriesDescription",
    "PatientID",
    "AccessionNumber",
    "PatientName",  # shown only with [api] show_patient_names
    "StudyDate",
)


def read_header(source: Path | bytes, keywords: tuple[str, ...] | None = None) -> Dataset:
    """Parse a DICOM file up to, not including, its pixel data.

    Cheap for large images: the pixel data is never read or decoded. With
    ``keywords``, only those elements are kept, and their values are decoded
    here so a malformed one fails now rather than later (pydicom decodes
    lazily); the receive step reads just :data:`INDEX_KEYWORDS` this way.

    Raises
    ------
    pydicom.errors.InvalidDicomError, ValueError, EOFError, NotImplementedError
        The bytes are not a DICOM file, or a requested value is malformed.
    """
    fp = BytesIO(source) if isinstance(source, bytes | bytearray) else source
    if keywords is None:
        return pydicom.dcmread(fp, stop_before_pixels=True)
    ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=list(keywords))
    for _ in ds:  # decode the few kept values now
        pass
    return ds


class FreeSpace:
    """Whether the spool's file system has room for another instance.

    Below ``min_free_mb`` MiB or ``min_free_percent`` % free, :meth:`ok` is
    False and the receive step answers 0xA700 "Out of resources" (PS3.4
    B.2.3) before writing anything, so the peer retries later instead of
    the node filling its disk. ``shutil.disk_usage`` is asked at most once
    every ``max_age_seconds``; each change of state is logged once (and
    given to ``on_change(path, reason, free_bytes)``, ``reason`` None once
    space returned: :meth:`node.notify.Notifier.disk`), and the node accepts
    again by itself when space returns.
    """

    def __init__(
        self, path: Path, min_free_mb: float, min_free_percent: float, *, max_age_seconds: float = 1.0,
        on_change: Callable[[str, str | None, int], None] | None = None,
    ):
        import structlog

        self.path = Path(path)
        self.min_free_bytes = min_free_mb * 2**20
        self.min_free_percent = min_free_percent
        self.max_age_seconds = max_age_seconds
        self.reason: str | None = None  # why there is no room, None when there is
        self._checked_at = -float("inf")
        self._log = structlog.get_logger("node.spool")
        self.on_change = on_change

    def ok(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at >= self.max_age_seconds:
            self._checked_at = now
            usage = shutil.disk_usage(self.path)
            percent = 100 * usage.free / usage.total if usage.total else 0.0
            short = usage.free < self.min_free_bytes or percent < self.min_free_percent
            reason = (
                f"{usage.free / 2**20:.0f} MiB ({percent:.1f} %) free on {self.path}; the node needs "
                f"{self.min_free_bytes / 2**20:.0f} MiB and {self.min_free_percent} %"
                if short
                else None
            )
            if (reason is None) != (self.reason is None):
                if reason:
                    self._log.error("disk_space_low", path=str(self.path), free_bytes=usage.free, reason=reason)
                else:
                    self._log.info("disk_space_recovered", path=str(self.path), free_bytes=usage.free)
                if self.on_change:
                    self.on_change(str(self.path), reason, usage.free)
            self.reason = reason
        return self.reason is None
