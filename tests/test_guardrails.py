"""Intended-use guardrails (node.guard): an input outside the model card's
intended use is refused (``out_of_scope``, nothing sent) or processed with a
warning, as configured, and the decision is in the job's timeline and in
``/metrics``.

The node is the real one (SCP, sweep, router, runner with the demo models);
the modality is an in-process pynetdicom SCU, the PACS an in-process Storage
SCP. The MR study is 26 slices of 5.5 mm (tests/mr_stack.py): refused before
the brain model runs, so the test stays fast.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom import Dataset
from pydicom.sr.codedict import codes

from models.card import ModelCard
from models.intended_use import IntendedUseRule
from node.config.guard import GuardSettings
from node.guard import age_in_years, evaluate, series_values
from node.index import JobState
from node.service import Node
from pipelines.base import Study
from tests.dicom_checks import run_dciodvfy
from tests.mr_stack import mr_study
from tests.peers import free_port, wait_for
from tests.test_dispatch import StoreSCP
from tests.test_outcomes import finished, send, small_cr

CHEST_ROUTE = {"name": "cxr", "pipeline": "pneumonia", "destinations": ["pacs"], "match": {"Modality": ["CR", "DX"]}}
BRAIN_ROUTE = {
    "name": "brain", "pipeline": "brain_tumour", "level": "study", "match": {"Modality": ["MR"]},
    "required_roles": ["T1", "T1c", "T2", "FLAIR"], "destinations": ["pacs"],
}


def in_envelope_cr(**changes) -> Dataset:
    """A frontal adult chest CR within the demo card's envelope: 8-bit
    MONOCHROME2, 0.5 mm pixels, PA, Patient's Age 045Y."""
    ds = small_cr()
    pixels = (np.frombuffer(ds.PixelData, np.uint16).reshape(64, 64) // 16).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = pixels.tobytes()
    ds.PatientAge = "045Y"
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture
def start_node(node_config):
    """``start_node(routes, pipelines)``: a running node and its PACS."""
    started = []

    def start(routes, pipelines):
        pacs = StoreSCP(free_port()).start()
        cfg = node_config(
            node={"bind_address": "127.0.0.1", "port": free_port()},
            storage={"fsync": False},
            completion={"sweep_interval_seconds": 0.2, "series_idle_seconds": 30, "complete_on_release": True,
                        "study_idle_seconds": 0.5},
            routes=routes,
            pipelines=pipelines,
            destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}},
            retry={"initial_delay_seconds": 0.2, "max_delay_seconds": 1},
            api={"enabled": False},
        )
        node = Node(cfg)
        node.start()
        started.append((node, pacs))
        return node, pacs, cfg

    yield start
    for node, pacs in started:
        node.stop()
        pacs.stop()


def decisions(node: Node) -> dict[tuple[str, str, str], float]:
    """(pipeline, rule, action) -> ainode_intended_use_decisions_total."""
    return {
        (s.labels["pipeline"], s.labels["rule"], s.labels["action"]): s.value
        for family in node.metrics.registry.collect()
        if family.name == "ainode_intended_use_decisions"
        for s in family.samples
        if s.name.endswith("_total")
    }


def job_reasons(node: Node, study_uid: str) -> list[str]:
    """The reasons of the study's job transitions, from its timeline."""
    return [e.data["reason"] or "" for e in node.index.study_timeline(study_uid) if e.event == "job_state"]


def test_refused_lateral_view_ends_out_of_scope_and_sends_nothing(start_node):
    node, pacs, cfg = start_node([CHEST_ROUTE], {"pneumonia": {"intended_use": {"default": "refuse"}}})
    lateral = in_envelope_cr(ViewPosition="LL")
    assert send(cfg, lateral) == [0x0000]
    job = wait_for(lambda: finished(node, lateral.SeriesInstanceUID), 60, 0.2, "the lateral view's job")
    assert job.state == JobState.OUT_OF_SCOPE
    assert "frontal_view" in job.error and "ViewPosition=LL" in job.error, job.error
    assert "bit_depth" not in job.error  # 8-bit: only the view is outside
    assert node.index.series_info(lateral.SeriesInstanceUID).state == "out_of_scope"
    assert node.index.job_results(job.id) == [] and pacs.received == []
    assert any("out of intended use (refuse): frontal_view" in r for r in job_reasons(node, lateral.StudyInstanceUID))
    assert decisions(node) == {("pneumonia", "frontal_view", "refuse"): 1.0}


def test_refused_thick_short_mr_study_ends_out_of_scope(start_node):
    node, pacs, cfg = start_node([BRAIN_ROUTE], {"brain_tumour": {"intended_use": {"default": "refuse"}}})
    study = mr_study((26, 32, 32), (1.0, 1.0, 5.5), seed="guardrails-thick")
    datasets = [ds for series in study.values() for ds in series]
    assert set(send(cfg, *datasets)) == {0x0000}
    study_uid = datasets[0].StudyInstanceUID

    def job():
        jobs = [j for j in node.index.jobs(50) if j.study_uid == study_uid]
        return jobs[0] if jobs and jobs[0].state not in (JobState.QUEUED, JobState.RUNNING) else None

    j = wait_for(job, 120, 0.2, "the MR study's job")
    assert j.state == JobState.OUT_OF_SCOPE, (j.state, j.error)
    assert "slice_thickness" in j.error and "SliceThickness=5.5" in j.error, j.error
    assert "slice_count" in j.error and "NumberOfSlices=26" in j.error, j.error
    assert "pixel_spacing" not in j.error  # 1.0 mm in-plane is within 0.8-1.2
    assert node.index.job_results(j.id) == [] and pacs.received == []
    counted = decisions(node)
    assert counted[("brain_tumour", "slice_thickness", "refuse")] == 4.0  # one per series
    assert counted[("brain_tumour", "slice_count", "refuse")] == 4.0


def result_paths(node: Node, job_id: int) -> dict[str, str]:
    """Modality (SEG, SR) -> the outbox file of the result object the job wrote."""
    return {r.modality: r.path for r in node.index.job_results(job_id)}


def sr_comments(path: str) -> list[str]:
    """The TEXT "Comment" (DCM 121106) items of the SR's measurement groups,
    read back with highdicom."""
    report = hd.sr.srread(path)
    groups = find_content_items(report, name=codes.DCM.MeasurementGroup, recursive=True)
    return [
        str(item.TextValue)
        for group in groups
        for item in find_content_items(group, name=codes.DCM.Comment, value_type=hd.sr.ValueTypeValues.TEXT)
    ]


def test_warn_processes_and_records_the_warning_in_envelope_input_has_none(start_node, tmp_path):
    node, pacs, cfg = start_node([CHEST_ROUTE], {})  # the default: warn
    twelve_bit, inside, lateral = small_cr(PatientAge="045Y"), in_envelope_cr(), in_envelope_cr(ViewPosition="LL")
    assert send(cfg, twelve_bit, inside, lateral) == [0x0000] * 3
    warned = wait_for(lambda: finished(node, twelve_bit.SeriesInstanceUID), 120, 0.2, "the 12-bit CR's job")
    clean = wait_for(lambda: finished(node, inside.SeriesInstanceUID), 120, 0.2, "the 8-bit CR's job")
    side = wait_for(lambda: finished(node, lateral.SeriesInstanceUID), 120, 0.2, "the lateral view's job")
    assert warned.state == clean.state == JobState.DONE
    # A lateral view is the guard's to decide, not the pipeline's (not_applicable): processed, with the warning.
    assert side.state == JobState.DONE, (side.state, side.error)
    paths = result_paths(node, side.id)
    [comment] = sr_comments(paths["SR"])
    assert comment.startswith("OUT OF INTENDED USE: frontal_view") and "ViewPosition=LL" in comment, comment
    assert "bit_depth" not in comment  # 8-bit: only the view is outside
    assert "OUT OF INTENDED USE" in pydicom.dcmread(paths["SEG"]).SeriesDescription
    assert len(node.index.job_results(warned.id)) == 2  # processed: a SEG and an SR
    [reason] = [r for r in job_reasons(node, twelve_bit.StudyInstanceUID) if r.startswith("2 results")]
    assert "out of intended use (warn): bit_depth" in reason and "BitsStored=12" in reason, reason
    [reason] = [r for r in job_reasons(node, inside.StudyInstanceUID) if r.startswith("2 results")]
    assert "intended use" not in reason
    assert decisions(node) == {("pneumonia", "bit_depth", "warn"): 1.0, ("pneumonia", "frontal_view", "warn"): 1.0}
    # The warned SR says why in its measurement group; both Series Descriptions say it.
    paths = result_paths(node, warned.id)
    [comment] = sr_comments(paths["SR"])
    assert comment.startswith("OUT OF INTENDED USE: bit_depth") and "BitsStored=12" in comment, comment
    for modality, path in paths.items():
        ds = pydicom.dcmread(path)
        assert "OUT OF INTENDED USE" in ds.SeriesDescription and "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
        result = run_dciodvfy(ds, tmp_path, name=f"warned-{modality}.dcm")
        assert result.errors == [] and result.returncode == 0, (modality, result.errors)
    paths = result_paths(node, clean.id)
    for modality, path in paths.items():
        description = pydicom.dcmread(path).SeriesDescription
        assert "OUT OF INTENDED USE" not in description and "NOT FOR DIAGNOSTIC USE" in description, modality
    assert sr_comments(paths["SR"]) == []


def test_rule_and_configuration_errors_name_the_rule():
    with pytest.raises(ValueError, match="rule 'ages'.*'PatientAgeYears' is neither a DICOM keyword"):
        IntendedUseRule(name="ages", description="adults", match={"PatientAgeYears": {"min": 18}})
    with pytest.raises(ValueError, match="invalid regular expression"):
        IntendedUseRule(name="view", description="frontal", match={"ViewPosition": "(PA"})
    with pytest.raises(ValueError, match="give min, max or both"):
        IntendedUseRule(name="thin", description="thin", match={"SliceThickness": {}})
    card = ModelCard.from_file(Path("models/cards/pneumonia-densenet121-demo.json"))
    data = card.model_dump(mode="json")
    data["intended_use_rules"] = [data["intended_use_rules"][0]] * 2
    with pytest.raises(ValueError, match="chest_radiograph repeated"):
        ModelCard(**data)
    ds = small_cr()
    study = Study(ds.StudyInstanceUID, {ds.SeriesInstanceUID: [ds]})
    with pytest.raises(ValueError, match="frontal_vew not a rule of model card pneumonia-densenet121-demo"):
        evaluate(card, study, GuardSettings(rules={"frontal_vew": "refuse"}))


def test_derived_attributes():
    assert age_in_years("045Y") == 45 and age_in_years("006M") == 0.5 and age_in_years("45") is None
    ds = small_cr()
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.139, 0.139]
    assert series_values([ds], "PixelSpacingMm") == ["0.139", "0.139"]
    assert series_values([ds, ds], "NumberOfSlices") == ["2"]
    assert series_values([ds], "PatientAgeInYears") == []  # absent: the adult rule does not hold it against the input
    card = ModelCard.from_file(Path("models/cards/pneumonia-densenet121-demo.json"))
    child = in_envelope_cr(PatientAge="010Y")
    found = evaluate(card, Study(child.StudyInstanceUID, {child.SeriesInstanceUID: [child]}), GuardSettings())
    assert [(d.rule, dict(d.values)) for d in found] == [("adult", {"PatientAgeInYears": "10"})]
    # A range holds for both Pixel Spacing values: 0.5 x 2.0 mm is outside 0.1-1.0.
    odd = in_envelope_cr(PixelSpacing=[0.5, 2.0])
    found = evaluate(card, Study(odd.StudyInstanceUID, {odd.SeriesInstanceUID: [odd]}), GuardSettings())
    assert [d.rule for d in found] == ["pixel_spacing"]


def test_out_of_intended_use_marker_survives_shortening():
    from pipelines.common.identity import AlgorithmDescription, series_description

    long_name = AlgorithmDescription(name="a-model-name-long-enough-to-force-the-shortest-form", version="1.2.3")
    for algorithm in (long_name, AlgorithmDescription(name="m", version="1.0")):
        marked = series_description("brain_tumour", algorithm, "SEG", out_of_intended_use=True)
        plain = series_description("brain_tumour", algorithm, "SEG")
        assert len(marked) <= 64 and "OUT OF INTENDED USE" in marked and "NOT FOR DIAGNOSTIC USE" in marked, marked
        assert "OUT OF INTENDED USE" not in plain and "NOT FOR DIAGNOSTIC USE" in plain
    assert series_description("brain_tumour", long_name, "SEG", out_of_intended_use=True) == (
        "SEG 1.2.3 OUT OF INTENDED USE NOT FOR DIAGNOSTIC USE"
    )
