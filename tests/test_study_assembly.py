"""Study-level rules: sequence identification, study completion, force-complete."""

from __future__ import annotations

import copy
import datetime as dt
from io import BytesIO

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from node.complete import CompletionSweep
from node.config import ConfigError, load_config
from node.index import Index, InstanceRecord, utcnow
from node.route import Router, classify_role
from node.spool import Spool, read_header

BRAIN = {
    "name": "brain",
    "pipeline": "brain_tumour",
    "level": "study",
    "match": {"Modality": ["MR"]},
    "required_roles": ["T1", "T1c", "T2", "FLAIR"],
    "destinations": ["pacs"],
}

# (SeriesDescription, ScanningSequence, TR, TE, TI, contrast agent)
PROTOCOL = {
    "T1": ("AX T1 SE", ["SE"], 500, 12, None, None),
    "T1c": ("AX T1 SE POST GD", ["SE"], 500, 12, None, "GADOBUTROL"),
    "T2": ("AX T2 TSE", ["SE"], 4000, 100, None, None),
    "FLAIR": ("AX T2 FLAIR", ["SE", "IR"], 9000, 120, 2500, None),
}


def header(description, scanning, tr, te, ti, agent) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.Modality = "MR"
    ds.SeriesDescription = description
    ds.ScanningSequence = scanning
    ds.RepetitionTime, ds.EchoTime = tr, te
    if ti is not None:
        ds.InversionTime = ti
    if agent is not None:
        ds.ContrastBolusAgent = agent
    return ds


@pytest.mark.parametrize("role", list(PROTOCOL))
def test_roles_from_descriptions(role):
    cfg = load_config(None)
    assert classify_role(header(*PROTOCOL[role]), cfg.sequences)[0] == role


@pytest.mark.parametrize("role", list(PROTOCOL))
def test_roles_from_acquisition_parameters_alone(role):
    cfg = load_config(None)
    found, reason = classify_role(header("series 7", *PROTOCOL[role][1:]), cfg.sequences)
    assert found == role, reason
    assert "rule 2 matched" in reason or "rule 3 matched" in reason


@pytest.mark.parametrize(
    "description, expected",
    [
        ("sag T1 MPRAGE", "T1"),
        ("T1 MPRAGE +C", "T1c"),
        ("ax t1 post contrast", "T1c"),
        ("T2_FLAIR_3D", "FLAIR"),
        ("Ax DWI b1000", None),
        ("ADC map", None),
        ("T2* GRE", None),
        ("3-plane localizer", None),
    ],
)
def test_descriptions_seen_in_practice(description, expected):
    cfg = load_config(None)
    ds = pydicom.Dataset()
    ds.Modality, ds.SeriesDescription = "MR", description
    assert classify_role(ds, cfg.sequences)[0] == expected


def test_study_rule_needs_known_roles():
    dest = {"pacs": {"kind": "dicom", "ae_title": "P", "host": "h", "port": 1}}
    with pytest.raises(ConfigError, match="required_roles.*'DWI' has no rules"):
        load_config(None, routes=[{**BRAIN, "required_roles": ["T1", "DWI"]}], destinations=dest)
    with pytest.raises(ConfigError, match="study-level rule needs"):
        load_config(None, routes=[{**BRAIN, "required_roles": []}], destinations=dest)


@pytest.fixture
def state(node_config):
    cfg = node_config(
        completion={"series_idle_seconds": 10, "study_idle_seconds": 5, "force_complete_seconds": 60},
        routes=[BRAIN],
        destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
    )
    index = Index(cfg.storage.index_url)
    spool = Spool(cfg.storage.spool_dir, cfg.storage.quarantine_dir, cfg.storage.outbox_dir)
    router = Router(cfg.routes, index, sequences=cfg.sequences)
    yield index, spool, CompletionSweep(cfg.completion, index, spool, router)
    index.close()


def add_series(index: Index, spool: Spool, study_uid: str, role: str, *, series_time="120000", slices=2) -> str:
    """A small MR series of ``slices`` instances with the protocol of ``role``."""
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    series_uid = generate_uid()
    description, scanning, tr, te, ti, agent = PROTOCOL[role]
    for i in range(slices):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
        ds.SeriesDescription, ds.ScanningSequence, ds.RepetitionTime, ds.EchoTime = description, scanning, tr, te
        ds.SeriesTime, ds.InstanceNumber = series_time, i + 1
        if ti is not None:
            ds.InversionTime = ti
        if agent is not None:
            ds.ContrastBolusAgent = agent
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = spool.store_instance(study_uid, series_uid, ds.SOPInstanceUID, buf.getvalue())
        index.record_instance(InstanceRecord.from_header(read_header(path), path, path.stat().st_size))
    return series_uid


def later(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


def test_study_completes_when_all_four_roles_are_complete(state):
    index, spool, sweep = state
    study = generate_uid()
    uids = {role: add_series(index, spool, study, role) for role in ("T1", "T1c", "T2")}
    sweep.sweep(later(11))
    assert index.jobs() == []  # FLAIR has not arrived
    uids["FLAIR"] = add_series(index, spool, study, "FLAIR")
    sweep.sweep(later(11))  # FLAIR complete and the study quiet for longer than study_idle_seconds
    [job] = index.jobs()
    assert job.level == "study" and job.state == "queued"
    import json

    assert json.loads(job.roles) == uids
    assert {index.series_info(u).state for u in uids.values()} == {"queued"}
    assert [t.to_state for t in index.transitions("study", f"{study}/brain")] == ["receiving", "complete", "queued"]


def test_missing_flair_fails_after_force_complete_naming_it(state):
    index, spool, sweep = state
    study = generate_uid()
    for role in ("T1", "T1c", "T2"):
        add_series(index, spool, study, role)
    sweep.sweep(later(11))
    sweep.sweep(later(30))
    assert index.jobs() == []
    sweep.sweep(later(61))
    [job] = index.jobs()
    assert job.state == "failed" and "missing FLAIR" in job.error
    assert job.started_at is None  # never run
    sweep.sweep(later(120))
    assert len(index.jobs()) == 1  # failed once, not again at every sweep


def test_repeat_acquisition_picks_the_later_series(state):
    index, spool, sweep = state
    study = generate_uid()
    uids = {role: add_series(index, spool, study, role) for role in ("T1", "T1c", "T2")}
    first = add_series(index, spool, study, "FLAIR", series_time="120000")
    repeat = add_series(index, spool, study, "FLAIR", series_time="121500", slices=1)
    sweep.sweep(later(11))
    [job] = index.jobs()
    import json

    roles = json.loads(job.roles)
    assert roles["FLAIR"] == repeat and roles["T1"] == uids["T1"]
    assert index.series_info(first).role == "FLAIR"  # identified, not chosen
