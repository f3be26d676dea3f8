"""Completion sweep, routing rules, job recovery: the index-side guarantees."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.complete import CompletionSweep
from node.config import ConfigError, load_config
from node.index import Index, InstanceRecord, utcnow
from node.route import Router, attribute_matches
from node.spool import Spool, read_header

ROUTE = {
    "name": "cxr",
    "pipeline": "pneumonia",
    "destinations": ["pacs"],
    "match": {"Modality": ["CR", "DX"], "BodyPartExamined": ["CHEST", ""]},
}


@pytest.fixture
def node_state(node_config):
    cfg = node_config(
        completion={"series_idle_seconds": 10, "complete_on_release": True, "unmatched_retention_hours": 1},
        routes=[ROUTE],
        destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
    )
    index = Index(cfg.storage.index_url)
    spool = Spool(cfg.storage.spool_dir, cfg.storage.quarantine_dir, cfg.storage.outbox_dir)
    router = Router(cfg.routes, index)
    sweep = CompletionSweep(cfg.completion, index, spool, router)
    yield cfg, index, spool, sweep
    index.close()


def spool_file(index: Index, spool: Spool, source: Path, assoc: str | None = None, **changes) -> pydicom.Dataset:
    ds = pydicom.dcmread(source)
    for k, v in changes.items():
        setattr(ds, k, v)
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path = spool.store_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buf.getvalue())
    if assoc:
        index.association_opened(assoc, "MOD", "127.0.0.1", 1234)
    index.record_instance(InstanceRecord.from_header(read_header(path), path, path.stat().st_size, association_id=assoc))
    return ds


def test_match_lists_regex_and_absent():
    ds = pydicom.Dataset()
    ds.Modality = "CR"
    ds.SeriesDescription = "Chest PA erect"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    assert attribute_matches(ds, "Modality", ["dx", "cr"])
    assert not attribute_matches(ds, "Modality", ["MR"])
    assert attribute_matches(ds, "BodyPartExamined", [""])  # absent
    assert not attribute_matches(ds, "BodyPartExamined", ["CHEST"])
    assert attribute_matches(ds, "SeriesDescription", r"chest\s+pa")
    assert not attribute_matches(ds, "SeriesDescription", r"^lateral")
    assert attribute_matches(ds, "ImageType", ["PRIMARY"])  # any value of a multi-valued attribute


def test_bad_rules_are_refused_naming_the_key():
    pacs = {"pacs": {"kind": "dicom", "ae_title": "P", "host": "h", "port": 1}}
    with pytest.raises(ConfigError, match=r"routes\.0\.match.*Modalty.*not a DICOM keyword"):
        load_config(None, routes=[{**ROUTE, "match": {"Modalty": ["CR"]}}], destinations=pacs)
    with pytest.raises(ConfigError, match=r"routes\[0\]\.destinations.*'pacs' is not defined"):
        load_config(None, routes=[ROUTE])
    with pytest.raises(ConfigError, match="invalid regular expression"):
        load_config(None, routes=[{**ROUTE, "match": {"SeriesDescription": "(unclosed"}}], destinations=pacs)


def test_series_completes_after_idle_and_is_routed(node_state, rg1_uncr):
    _, index, spool, sweep = node_state
    ds = spool_file(index, spool, rg1_uncr)
    assert sweep.sweep() == []  # just arrived
    later = utcnow() + dt.timedelta(seconds=11)
    assert sweep.sweep(later) == [ds.SeriesInstanceUID]
    assert index.series_info(ds.SeriesInstanceUID).state == "queued"
    [job] = index.jobs()
    assert (job.pipeline, job.route, job.series_uid, job.state) == ("pneumonia", "cxr", ds.SeriesInstanceUID, "queued")
    states = [t.to_state for t in index.transitions("series", ds.SeriesInstanceUID)]
    assert states == ["receiving", "complete", "queued"]


def test_release_completes_at_once(node_state, rg1_uncr):
    _, index, spool, sweep = node_state
    ds = spool_file(index, spool, rg1_uncr, assoc="a-1")
    assert index.association_closed("a-1", "released") == 1
    assert sweep.sweep() == [ds.SeriesInstanceUID]
    assert "association released" in index.transitions("series", ds.SeriesInstanceUID)[1].reason


def test_abort_waits_for_idle(node_state, rg1_uncr):
    _, index, spool, sweep = node_state
    spool_file(index, spool, rg1_uncr, assoc="a-2")
    assert index.association_closed("a-2", "aborted") == 0
    assert sweep.sweep() == []


def test_unmatched_series_kept_then_purged(node_state, rg1_uncr):
    _, index, spool, sweep = node_state
    ds = spool_file(index, spool, rg1_uncr, Modality="MR")
    sweep.sweep(utcnow() + dt.timedelta(seconds=11))
    assert index.series_info(ds.SeriesInstanceUID).state == "unmatched"
    assert index.jobs() == []
    assert len(list(spool.iter_instances())) == 1
    sweep.sweep(utcnow() + dt.timedelta(hours=2))
    assert index.series_info(ds.SeriesInstanceUID).state == "purged"
    assert list(spool.iter_instances()) == []


def test_new_instance_reopens_a_finished_series(node_state, rg1_uncr):
    _, index, spool, sweep = node_state
    ds = spool_file(index, spool, rg1_uncr)
    sweep.sweep(utcnow() + dt.timedelta(seconds=11))
    spool_file(index, spool, rg1_uncr, SOPInstanceUID=generate_uid())
    info = index.series_info(ds.SeriesInstanceUID)
    assert info.state == "receiving" and info.instance_count == 2


def test_recover_requeues_running_jobs_and_stops_crash_loops(node_state):
    _, index, _, _ = node_state
    job = index.create_job(pipeline="pneumonia", route="cxr", level="series", study_uid="1.2", series_uid=None, destinations=["pacs"])
    assert index.claim_job().id == job
    assert index.recover_jobs(max_attempts=2) == (1, 0)
    assert index.job(job).state == "queued"
    assert index.claim_job().attempts == 2
    assert index.recover_jobs(max_attempts=2) == (0, 1)
    j = index.job(job)
    assert j.state == "failed" and "stopped during this job 2 times" in j.error


def test_missing_paths_finds_unindexed_spool_files(node_state, rg1_uncr):
    _, index, spool, _ = node_state
    ds = pydicom.dcmread(rg1_uncr)
    path = spool.store_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, Path(rg1_uncr).read_bytes())
    assert index.missing_paths(spool.iter_instances()) == [path]
