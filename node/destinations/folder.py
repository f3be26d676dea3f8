"""``kind = "folder"``: results written into a directory tree, for a research
share or a mounted drive::

    <path>/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

Each file is written as the outbox holds it (DICOM File Format, PS3.10 7),
atomically (:func:`node.spool.write_durable`: temporary file, fsync, rename,
fsync of the directory), so a reader of the share never sees half a file; a
re-sent result replaces its file. The folder itself is never created: a
missing folder (a share not mounted yet) is a transient failure, so results
never fill the mount point's own disk.

The four path components come from the data, so each is made safe by
:func:`path_component`: nothing can name a directory outside the folder.
Write errors are classified by :func:`node.outcome.classify_os_error`: a
full disk (ENOSPC) is retried, a folder we may not write (EACCES, EPERM,
EROFS) fails at once. On a case-insensitive file system (SMB, exFAT)
Patient IDs differing only in case share a folder; the files, named by SOP
Instance UID, stay apart.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pydicom
from pydantic import Field

from node.destinations.base import DestinationConfig, DestinationKind
from node.outcome import Outcome, OutcomeClass, classify_os_error
from node.spool import write_durable

#: Longest path component written, in characters (the hash marker included).
MAX_COMPONENT = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MARKER = re.compile(r"_[0-9a-f]{16}$")
_KEYWORDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def path_component(value: object, empty: str = "UNKNOWN") -> str:
    """``value`` (an attribute's value, or None) as one safe path component.

    Characters outside ``A-Za-z0-9._-`` become ``_``, as do leading dots (so
    ``.``, ``..`` and hidden names cannot occur); an empty value becomes
    ``empty``. Where this changed the value, or it is longer than
    :data:`MAX_COMPONENT`, it is cut to fit and ``_`` plus 16 hex digits of
    the SHA-256 of the original value are appended, so two different
    values never share a component (a value that already ends like such a
    marker gets one too). A UID (digits and dots) is kept as it is.
    """
    original = "" if value is None else str(value)
    safe = _UNSAFE.sub("_", original)
    safe = "_" * (len(safe) - len(safe.lstrip("."))) + safe.lstrip(".")
    if not safe:
        safe = empty
    if safe == original and len(safe) <= MAX_COMPONENT and not _MARKER.search(safe):
        return safe
    digest = hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{safe[: MAX_COMPONENT - 17]}_{digest}"


def relative_path(ds: pydicom.Dataset) -> Path:
    """``<PatientID>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` for ``ds``, each part
    made safe by :func:`path_component`."""
    parts = [path_component(ds.get(k)) for k in _KEYWORDS]
    return Path(*parts[:3], f"{parts[3]}.dcm")


class FolderDestination(DestinationConfig):
    """A folder (a research share, a mounted drive) that must exist."""

    kind: Literal["folder"]
    path: Path = Field(description="The folder; it is not created (a share not mounted is a transient failure).")
    fsync: bool = Field(True, description="fsync each file and its directory before the delivery counts as done.")


class FolderSender(DestinationKind):
    """Writes each result under the folder (module docstring)."""

    kind = "folder"
    Config = FolderDestination
    config: FolderDestination

    @property
    def target(self) -> str:
        return f"folder {self.config.path}"

    def classify(self, result: object) -> OutcomeClass:
        """``result``: the :class:`OSError` of a failed read or write."""
        if not isinstance(result, OSError):
            raise TypeError(f"expected an OSError, got {type(result).__name__}")
        return classify_os_error(result)

    def _missing(self) -> Outcome | None:
        if self.config.path.is_dir():
            return None
        text = f"{self.config.path} does not exist or is not a directory (a share not mounted?)"
        return Outcome(OutcomeClass.TRANSIENT, "ENOENT", text)

    def _os_outcome(self, exc: OSError, what: str) -> Outcome:
        return self.outcome(exc, errno.errorcode.get(exc.errno or 0), f"{what}: {exc.strerror or exc}")

    def echo(self) -> Outcome:
        """A test file written, fsynced and removed in the folder."""
        if (missing := self._missing()) is not None:
            return missing
        root = self.config.path
        try:
            fd, name = tempfile.mkstemp(prefix=".ainode-echo-", suffix=".tmp", dir=root)
            try:
                os.write(fd, b"ainode echo\n")
                if self.config.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(name)
            free = shutil.disk_usage(root).free
        except OSError as exc:
            return self._os_outcome(exc, f"cannot write in {root}")
        return Outcome(OutcomeClass.SUCCESS, None, f"{root} is writable, {free / 2**30:.1f} GiB free")

    def send(self, paths: Sequence[Path]) -> list[Outcome]:
        if (missing := self._missing()) is not None:
            return [missing for _ in paths]
        return [self._write(Path(p)) for p in paths]

    def _write(self, source: Path) -> Outcome:
        root = self.config.path
        try:
            data = source.read_bytes()
        except OSError as exc:
            return self._os_outcome(exc, f"cannot read {source}")
        try:
            ds = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=list(_KEYWORDS))
        except Exception as exc:  # pydicom raises many kinds on a damaged file: a retry reads the same
            return Outcome(OutcomeClass.PERMANENT, None, f"cannot read {source} as DICOM: {type(exc).__name__}: {exc}")
        relative = relative_path(ds)
        target = root / relative
        # A symbolic link inside the folder must not lead the write out of it.
        if not target.resolve().is_relative_to(root.resolve()):
            return Outcome(OutcomeClass.PERMANENT, None, f"{target} leads outside {root} (a symbolic link?)")
        try:
            write_durable(target, data, fsync=self.config.fsync)
        except OSError as exc:
            return self._os_outcome(exc, f"cannot write {target}")
        return Outcome(OutcomeClass.SUCCESS, None, f"written {relative}")
