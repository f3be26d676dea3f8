"""The cases of a validation: what the replay fed the pipeline (source
headers), what the pipeline said (the result SR / SEG), what the site says
(the labels file), and which cases the model was trained or validated on.

Identifiers of a case (used for the labels and the leakage check): Patient
ID (0010,0020), Study Instance UID (0020,000D), the source images' SOP
Instance UIDs (0008,0018), Accession Number (0008,0050) and the source
files' stems (the file name without ``.dcm``: the ChestX-ray14 image index
of a wrapped PNG, for instance).
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import pydicom
import structlog
from pydicom.errors import InvalidDicomError

from models.card import ModelCard
from node.replay.sources import ReplayFilters, Source

log = structlog.get_logger("node.validate")

#: Written beside the results by ``ainode validate SOURCE --out``: one JSON
#: line per source instance fetched (its identifiers and subgroup attributes).
HEADERS_FILE = "validation-headers.jsonl"
#: Labels-file identifier columns, in the order they are preferred.
ID_COLUMNS = ("SOPInstanceUID", "StudyInstanceUID", "AccessionNumber")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def header_row(ds: pydicom.Dataset, path: Path) -> dict:
    """What validation keeps of one source instance."""
    def get(keyword: str) -> str:
        return str(ds.get(keyword, "") or "").strip()

    return {
        "sop_uid": get("SOPInstanceUID"), "study_uid": get("StudyInstanceUID"), "series_uid": get("SeriesInstanceUID"),
        "accession": get("AccessionNumber"), "patient_id": get("PatientID"), "sex": get("PatientSex"),
        "age": get("PatientAge"), "view": get("ViewPosition"), "manufacturer": get("Manufacturer"),
        "modality": get("Modality"), "file_stem": Path(path).name.removesuffix(".dcm"),
    }


class RecordingSource(Source):
    """A replay source whose fetched instances' headers are appended to
    ``out_dir / HEADERS_FILE`` (the subgroups and identifiers of the report)."""

    def __init__(self, inner: Source, out_dir: Path):
        self.inner = inner
        self.label = f"{inner.label} (validate)"
        self.path = Path(out_dir) / HEADERS_FILE

    def list_studies(self, filters: ReplayFilters):
        return self.inner.list_studies(filters)

    def fetch(self, study_uid: str, folder: Path) -> list[Path]:
        paths = self.inner.fetch(study_uid, folder)
        rows = []
        for path in paths:
            try:
                rows.append(header_row(pydicom.dcmread(path, stop_before_pixels=True), path))
            except (InvalidDicomError, OSError) as exc:  # the replay itself reports the damaged file
                log.info("validate_header_unreadable", path=str(path), reason=str(exc))
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return paths

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class Case:
    """One scored unit: a source image (chest: its SR) or a study (segmentation: its SEG)."""

    key: str
    study_uid: str
    patient_id: str = ""
    accession: str = ""
    sop_uids: tuple[str, ...] = ()
    file_stems: tuple[str, ...] = ()
    sex: str = ""
    age: str = ""
    view: str = ""
    manufacturer: str = ""
    probability: float | None = None
    seg_path: Path | None = None
    result_paths: tuple[Path, ...] = ()

    @property
    def identifiers(self) -> set[str]:
        """Every identifier of the case (see the module docstring)."""
        return {i for i in (self.patient_id, self.study_uid, self.accession, *self.sop_uids, *self.file_stems) if i}


def read_headers(results_dir: Path) -> dict[str, dict]:
    """SOP Instance UID -> header row, from ``HEADERS_FILE`` (empty when absent)."""
    path = Path(results_dir) / HEADERS_FILE
    rows: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["sop_uid"]] = row
    return rows


def _evidence_sops(ds: pydicom.Dataset) -> tuple[str, ...]:
    """Referenced SOP Instance UIDs of an SR's Current Requested Procedure
    Evidence Sequence (0040,A375), PS3.3 C.17.2."""
    return tuple(str(sop.ReferencedSOPInstanceUID) for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                 for series in study.get("ReferencedSeriesSequence", [])
                 for sop in series.get("ReferencedSOPSequence", []))


def _from_headers(key: str, ds: pydicom.Dataset, rows: list[dict], **values) -> Case:
    """A case from the source header rows (or, without them, the result's own
    patient and study attributes, which the pipelines copy from the source)."""
    first = rows[0] if rows else {}

    def pick(name: str, keyword: str) -> str:
        return first.get(name) or (str(ds.get(keyword, "") or "") if keyword else "")

    return Case(key=key, study_uid=str(ds.StudyInstanceUID), patient_id=pick("patient_id", "PatientID"),
                accession=pick("accession", "AccessionNumber"), sex=pick("sex", "PatientSex"),
                age=pick("age", "PatientAge"), view=pick("view", ""), manufacturer=pick("manufacturer", ""),
                file_stems=tuple(sorted({r["file_stem"] for r in rows if r.get("file_stem")})), **values)


def collect_cases(results_dir: Path, task: str) -> list[Case]:
    """The cases of a results folder (``ainode replay --out``'s layout, any depth).

    ``task`` ``"classification"``: one case per result SR (its probability,
    :func:`node.findings.read_finding`), keyed by the source image's SOP
    Instance UID; ``"segmentation"``: one case per SEG, keyed by its Study
    Instance UID.

    Raises
    ------
    ValueError
        No result of the task in the folder, or two SEGs for one study.
    """
    from node.findings import read_finding

    headers = read_headers(results_dir)
    by_series: dict[str, list[dict]] = defaultdict(list)
    for row in headers.values():
        by_series[row["series_uid"]].append(row)
    cases: dict[str, Case] = {}
    for path in sorted(Path(results_dir).rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if task == "classification" and ds.Modality == "SR":
            sops = _evidence_sops(ds)
            finding = read_finding(path)
            if finding.probability is None or not sops:
                continue
            key = sops[0]
            cases[key] = _from_headers(key, ds, [headers[s] for s in sops if s in headers], sop_uids=sops,
                                       probability=finding.probability, result_paths=(path,))
        elif task == "segmentation" and ds.Modality == "SEG":
            key = str(ds.StudyInstanceUID)
            if key in cases:
                raise ValueError(f"{results_dir}: two SEGs of study {key} ({cases[key].seg_path}, {path.name})")
            series = [str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])]
            rows = [r for s in series for r in by_series.get(s, [])]
            rows += [r for r in headers.values() if r["study_uid"] == key and r not in rows]
            cases[key] = _from_headers(key, ds, rows, sop_uids=tuple(r["sop_uid"] for r in rows), seg_path=path,
                                       result_paths=(path,))
    if not cases:
        kind = "SR with a probability" if task == "classification" else "SEG"
        raise ValueError(f"{results_dir}: no result {kind} found")
    return list(cases.values())


@dataclass(frozen=True)
class Labels:
    """The site's ground truth: ``column`` (one of :data:`ID_COLUMNS`) -> value
    (0/1 for a classification; a label file for a segmentation)."""

    column: str
    values: dict[str, int | Path]
    path: Path


def read_labels(path: Path, task: str) -> Labels:
    """Read a labels CSV: an identifier column (SOPInstanceUID,
    StudyInstanceUID or AccessionNumber; spaces and case ignored, so "SOP
    Instance UID" works) and a ``label`` column: 0 or 1 for a classification;
    for a segmentation the path (relative to the CSV) of a label NIfTI file or
    a DICOM SEG.

    Raises
    ------
    ValueError
        No identifier or label column, a label that is not 0/1, a label file
        that does not exist, or an identifier given twice; naming the row.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        names = {_norm(n): n for n in reader.fieldnames or []}
        column = next((c for c in ID_COLUMNS if _norm(c) in names), None)
        if column is None or "label" not in names:
            raise ValueError(f"{path}: expected a 'label' column and one of {', '.join(ID_COLUMNS)}; got {reader.fieldnames}")
        values: dict[str, int | Path] = {}
        for line, row in enumerate(reader, start=2):
            ident, raw = (row[names[_norm(column)]] or "").strip(), (row[names["label"]] or "").strip()
            if not ident:
                continue
            if ident in values:
                raise ValueError(f"{path} line {line}: {column} {ident} given twice")
            if task == "classification":
                if raw not in ("0", "1"):
                    raise ValueError(f"{path} line {line}: label must be 0 or 1, got {raw!r}")
                values[ident] = int(raw)
            else:
                label_file = (path.parent / raw).resolve()
                if not raw or not label_file.is_file():
                    raise ValueError(f"{path} line {line}: label file {raw!r} not found")
                values[ident] = label_file
    return Labels(column, values, path)


def label_key(case: Case, column: str) -> list[str]:
    """The identifiers of ``case`` under a labels ``column``."""
    if column == "SOPInstanceUID":
        return list(case.sop_uids)
    return [case.study_uid if column == "StudyInstanceUID" else case.accession]


def merge_by_study(cases: list[Case], column: str) -> list[Case]:
    """For study- or accession-level labels of a classification: one case
    per study, its probability the highest of its images'."""
    if column == "SOPInstanceUID":
        return cases
    groups: dict[str, list[Case]] = defaultdict(list)
    for c in cases:
        groups[label_key(c, column)[0]].append(c)
    merged = []
    for key, group in groups.items():
        top = max(group, key=lambda c: c.probability or 0.0)
        merged.append(replace(top, key=key, sop_uids=tuple(s for c in group for s in c.sop_uids),
                              file_stems=tuple(s for c in group for s in c.file_stems),
                              result_paths=tuple(p for c in group for p in c.result_paths)))
    return merged


@dataclass
class LeakageCheck:
    """Cases whose identifiers are among the card's training or validation
    members: case key -> (the matching identifiers, "training"/"validation")."""

    leaked: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    members_listed: int = 0

    def describe(self, key: str) -> str:
        ids, sets = self.leaked[key]
        return f"{' and '.join(sets)} member(s) {', '.join(sorted(ids))}"


def card_members(card: ModelCard) -> dict[str, set[str]]:
    """``training`` / ``validation`` -> the identifiers a card lists: its
    ``training_data.training_members`` / ``validation_members``, and the
    split's ``train``/``val`` member groups."""
    data = card.training_data
    split = data.split.members if data.split else {}
    return {
        "training": set(data.training_members) | set(split.get("train", [])) | set(split.get("training", [])),
        "validation": set(data.validation_members) | set(split.get("val", [])) | set(split.get("validation", [])),
    }


def check_leakage(cases: list[Case], card: ModelCard) -> LeakageCheck:
    """Which ``cases`` the model saw in training or validation (any identifier
    of :attr:`Case.identifiers` among the card's members)."""
    members = card_members(card)
    check = LeakageCheck(members_listed=sum(len(m) for m in members.values()))
    for case in cases:
        ids = case.identifiers
        hits = {name: sorted(ids & m) for name, m in members.items() if ids & m}
        if hits:
            check.leaked[case.key] = (sorted({i for h in hits.values() for i in h}), sorted(hits))
    return check
