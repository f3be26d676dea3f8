"""Where ``ainode replay`` reads studies from: a folder, a DICOMweb root, or
a DICOM peer. Each source lists studies (:meth:`Source.list_studies`) and fetches
one study's instances into the replay's work folder (:meth:`Source.fetch`),
never into the node's spool.

- :class:`FolderSource`: DICOM files under a folder (read in place);
- :class:`DicomwebSource`: QIDO-RS to list (PS3.18 10.6), WADO-RS to fetch
  (PS3.18 10.4), with dicomweb-client;
- :class:`DicomPeerSource`: C-FIND to list (Study Root, PS3.4 C.4.1) and
  C-GET (PS3.4 C.4.3: the instances come back as C-STORE sub-operations on
  the same association, our side taking the SCP role, PS3.7 D.3.3.4) or
  C-MOVE (PS3.4 C.4.2: the peer sends them to the replay's own storage SCP,
  :class:`MoveReceiver`, which the peer knows as ``move_ae``), with pynetdicom.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.destinations.folder import path_component

log = structlog.get_logger("node.replay")

_MODALITY = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # CS, PS3.5 6.2
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class FetchError(RuntimeError):
    """A study could not be fetched (the reason is the message); the study
    is marked failed and the replay goes on."""


@dataclass(frozen=True)
class ReplayFilters:
    """Which studies a replay takes.

    Attributes
    ----------
    since, until:
        Study Date (0008,0020) range, both ends included; None: open.
    modalities:
        Modality values; a study is taken when ModalitiesInStudy (0008,0061)
        holds one of them. Empty: any.
    studies:
        Study Instance UIDs (``--studies FILE``); None: any.

    Raises
    ------
    ValueError
        ``since`` after ``until``, a modality that is not a CS value, or a
        Study Instance UID that is not a UID (PS3.5 9.1), naming it.
    """

    since: dt.date | None = None
    until: dt.date | None = None
    modalities: tuple[str, ...] = ()
    studies: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.since and self.until and self.since > self.until:
            raise ValueError(f"since: {self.since} is after until {self.until}")
        for m in self.modalities:
            if not _MODALITY.match(m):
                raise ValueError(f"modality: {m!r} is not a Modality value (1-16 of A-Z 0-9 _ space)")
        for uid in self.studies or ():
            if len(uid) > 64 or not _UID.match(uid):
                raise ValueError(f"studies: {uid!r} is not a Study Instance UID")

    def date_range(self) -> str:
        """The DICOM range matching value (PS3.4 C.2.2.2.5) of Study Date; '' when open."""
        if not (self.since or self.until):
            return ""
        fmt = "%Y%m%d"
        return f"{self.since.strftime(fmt) if self.since else ''}-{self.until.strftime(fmt) if self.until else ''}"

    def to_json(self) -> str:
        """A canonical form (the run's key is its digest)."""
        return json.dumps(
            {
                "since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None,
                "modalities": sorted(self.modalities),
                "studies": sorted(self.studies) if self.studies is not None else None,
            },
            sort_keys=True,
        )

    def matches(self, study: ListedStudy) -> bool:
        """Whether ``study`` passes, from what the source said of it (a
        source that ignores a query key is filtered here; an unknown
        date or modality list is taken)."""
        if self.studies is not None and study.study_uid not in self.studies:
            return False
        if study.study_date and (self.since or self.until):
            try:
                day = dt.datetime.strptime(study.study_date[:8], "%Y%m%d").date()
            except ValueError:
                return False
            if (self.since and day < self.since) or (self.until and day > self.until):
                return False
        if self.modalities and study.modalities and not set(self.modalities) & set(study.modalities):
            return False
        return True


@dataclass(frozen=True)
class ListedStudy:
    """What a source says of one study."""

    study_uid: str
    study_date: str | None = None
    modalities: tuple[str, ...] = ()


def _queries(filters: ReplayFilters) -> Iterator[tuple[str | None, str | None]]:
    """(Study Instance UID or None, modality or None) per query to send:
    one per listed study, times one per modality (a peer may not match a
    multi-valued ModalitiesInStudy)."""
    for uid in filters.studies if filters.studies is not None else (None,):
        for modality in filters.modalities or (None,):
            yield uid, modality


class Source(ABC):
    """A place studies are replayed from."""

    #: How the run records it (``replay_runs.source``).
    label: str

    @abstractmethod
    def list_studies(self, filters: ReplayFilters) -> list[ListedStudy]:
        """The studies that pass ``filters``, each once."""

    @abstractmethod
    def fetch(self, study_uid: str, folder: Path) -> list[Path]:
        """The study's instances as files; written under ``folder`` (which
        exists) where they come over the network. Raises :class:`FetchError`."""

    def close(self) -> None:  # noqa: B027  (optional)
        """Release what the source holds (a listening SCP)."""


def _dedupe(found: list[ListedStudy], filters: ReplayFilters) -> list[ListedStudy]:
    out: dict[str, ListedStudy] = {}
    for study in found:
        if study.study_uid not in out and filters.matches(study):
            out[study.study_uid] = study
    return list(out.values())


class FolderSource(Source):
    """DICOM files under ``root`` (any depth; files that are not DICOM are skipped)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.label = f"folder {self.root.resolve()}"
        self._files: dict[str, list[Path]] | None = None

    def _scan(self) -> tuple[dict[str, list[Path]], dict[str, ListedStudy]]:
        files: dict[str, list[Path]] = {}
        dates: dict[str, str | None] = {}
        modalities: dict[str, set[str]] = {}
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "StudyDate", "Modality"])
                uid = str(ds.StudyInstanceUID)
            except (InvalidDicomError, AttributeError, OSError) as exc:
                log.info("replay_file_skipped", path=str(path), reason=f"{type(exc).__name__}: {exc}")
                continue
            files.setdefault(uid, []).append(path)
            dates.setdefault(uid, str(ds.get("StudyDate", "") or "") or None)
            modalities.setdefault(uid, set()).add(str(ds.get("Modality", "") or ""))
        listed = {u: ListedStudy(u, dates[u], tuple(sorted(m for m in modalities[u] if m))) for u in files}
        return files, listed

    def list_studies(self, filters: ReplayFilters) -> list[ListedStudy]:
        self._files, listed = self._scan()
        return _dedupe(list(listed.values()), filters)

    def fetch(self, study_uid: str, folder: Path) -> list[Path]:
        if self._files is None:
            self._files, _ = self._scan()
        paths = self._files.get(study_uid)
        if not paths:
            raise FetchError(f"no file of study {study_uid} under {self.root}")
        return list(paths)


class DicomwebSource(Source):
    """A DICOMweb root (``http(s)://.../dicom-web``): QIDO-RS and WADO-RS."""

    def __init__(self, url: str, *, timeout: float = 60.0):
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        self.label = f"dicomweb {self.url}"
        self.client = DICOMwebClient(self.url, timeout=timeout)

    def list_studies(self, filters: ReplayFilters) -> list[ListedStudy]:
        found = []
        for uid, modality in _queries(filters):
            search = {k: v for k, v in (("StudyInstanceUID", uid), ("ModalitiesInStudy", modality),
                                        ("StudyDate", filters.date_range())) if v}
            try:
                answers = self.client.search_for_studies(search_filters=search, get_remaining=True,
                                                         fields=["ModalitiesInStudy"])
            except Exception as exc:  # requests' and dicomweb-client's errors alike
                raise FetchError(f"QIDO-RS {self.url}/studies: {type(exc).__name__}: {exc}") from exc
            for answer in answers:
                ds = Dataset.from_json(answer)
                found.append(ListedStudy(str(ds.StudyInstanceUID), _text(ds, "StudyDate"), _values(ds, "ModalitiesInStudy")))
        return _dedupe(found, filters)

    def fetch(self, study_uid: str, folder: Path) -> list[Path]:
        paths = []
        try:
            for ds in self.client.iter_study(study_uid):
                paths.append(_save(ds, folder))
        except Exception as exc:
            raise FetchError(f"WADO-RS {self.url}/studies/{study_uid}: {type(exc).__name__}: {exc}") from exc
        if not paths:
            raise FetchError(f"WADO-RS {self.url}/studies/{study_uid}: no instances")
        return paths


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value else None


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if not value:
        return ()
    return tuple(str(v) for v in (value if isinstance(value, pydicom.multival.MultiValue) else [value]))


def _save(ds: Dataset, folder: Path) -> Path:
    """Write one fetched instance as ``<folder>/<SOPInstanceUID>.dcm`` (DICOM File Format)."""
    path = Path(folder) / f"{path_component(ds.get('SOPInstanceUID'))}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class _Fetched:
    """The C-STORE sub-operations of one fetch (C-GET or C-MOVE)."""

    study_uid: str
    folder: Path
    paths: list[Path] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _store_into(fetched: _Fetched | None, event) -> int:
    """Write one C-STORE sub-operation's instance into the fetch's folder.

    Statuses (PS3.4 GG.4.1.1): 0x0000 stored; 0xC210 "Cannot understand"
    when the data set cannot be decoded; 0xA900 when it is not of the study
    being fetched (or nothing is being fetched); 0xA700 "Out of resources"
    only when our own disk fails.
    """
    try:
        ds = event.dataset
        ds.file_meta = event.file_meta
        study_uid = str(ds.StudyInstanceUID)
    except Exception as exc:  # pydicom raises many kinds on malformed data
        log.warning("replay_instance_refused", reason=f"{type(exc).__name__}: {exc}")
        return 0xC210
    if fetched is None or study_uid != fetched.study_uid:
        log.warning("replay_instance_refused", study_uid=study_uid, reason="not of the study being fetched")
        return 0xA900
    try:
        path = _save(ds, fetched.folder)
    except OSError as exc:
        log.error("replay_instance_not_written", error=str(exc))
        return 0xA700
    except Exception as exc:  # a value pydicom cannot write back
        with fetched.lock:
            fetched.refused.append(f"{ds.get('SOPInstanceUID')}: {type(exc).__name__}: {exc}")
        return 0xC210
    with fetched.lock:
        fetched.paths.append(path)
    return 0x0000
