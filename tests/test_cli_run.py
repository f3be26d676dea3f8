"""``ainode run`` for study-level pipelines: the sequence roles assigned as
the node assigns them (``node.route.assign_roles``), ``--role`` overrides,
and one real run of the brain tumour pipeline on a converted BraTS case."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid
from structlog.testing import capture_logs
from typer.testing import CliRunner

from node.cli import app
from node.config import load_config
from node.route import SeriesCandidate, assign_roles
from pipelines.brain_tumour.convert import SEQUENCE_PROTOCOLS, write_series
from tests.brain_phantom import make_phantom
from tests.conftest import shared_file
from tests.peers import REPO, SHARED_DATA
from tests.test_study_assembly import add_series, later, state  # noqa: F401  (state is a fixture)

runner = CliRunner()
BRATS_CASE = SHARED_DATA / "brats" / "BraTS-GLI-00001-000"
ROLES = ("T1", "T1c", "T2", "FLAIR")


def _candidates(datasets_by_role: dict[str, list[pydicom.Dataset]]) -> list[SeriesCandidate]:
    return [SeriesCandidate(ds[0].SeriesInstanceUID, ds[0], len(ds)) for ds in datasets_by_role.values()]


def _repeat(datasets: list[pydicom.Dataset], series_time: str) -> list[pydicom.Dataset]:
    """The same series acquired again later: new Series/SOP Instance UIDs."""
    series_uid = generate_uid()
    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        ds.SeriesInstanceUID, ds.SeriesTime = series_uid, series_time
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return out


def _empty_config(tmp_path: Path) -> Path:
    """No routes: the roles come from the pipeline itself."""
    path = tmp_path / "node.toml"
    path.write_text("")
    return path


def test_phantom_roles_from_the_sequence_rules():
    phantom = make_phantom(size=(16, 16, 4))
    roles, decisions = assign_roles(_candidates(phantom.datasets), ROLES, load_config(None).sequences)
    assert roles == dict(phantom.study.roles)
    for d in decisions:
        description = SEQUENCE_PROTOCOLS[d.role].series_description
        assert (d.identified, d.description) == (d.role, description)
        assert d.reason == f"{d.role} rule 1 matched: SeriesDescription={description}; selected: only candidate"


def test_repeat_goes_to_the_later_acquisition_unless_overridden():
    phantom = make_phantom(size=(16, 16, 4))
    sequences = load_config(None).sequences
    first = phantom.datasets["T1c"][0].SeriesInstanceUID
    repeat = _repeat(phantom.datasets["T1c"], "235959")
    candidates = [*_candidates(phantom.datasets), SeriesCandidate(repeat[0].SeriesInstanceUID, repeat[0], len(repeat))]

    roles, decisions = assign_roles(candidates, ROLES, sequences)
    assert roles["T1c"] == repeat[0].SeriesInstanceUID
    why = {d.series_uid: d for d in decisions}
    assert f"selected: latest acquisition ({repeat[0].SeriesDate}235959, 4 instances) over {first}" in why[roles["T1c"]].reason
    assert why[first].role is None and why[first].reason.endswith(f"not selected: {roles['T1c']} fills T1c")

    roles, decisions = assign_roles(candidates, ROLES, sequences, {"T1c": first})
    assert roles["T1c"] == first
    why = {d.series_uid: d for d in decisions}
    assert why[first].reason.startswith("T1c set by override (sequence rules: T1c rule 1 matched:")
    assert why[repeat[0].SeriesInstanceUID].role is None

    # The T1c series forced into T1: it leaves T1c, which its repeat fills; the T1 series is unused.
    t1 = phantom.datasets["T1"][0].SeriesInstanceUID
    roles, _ = assign_roles(candidates, ROLES, sequences, {"T1": first})
    assert roles["T1"] == first and roles["T1c"] == repeat[0].SeriesInstanceUID and t1 not in roles.values()

    with pytest.raises(ValueError, match="DWI: not a required role"):
        assign_roles(candidates, ROLES, sequences, {"DWI": first})
    with pytest.raises(ValueError, match="T1c=1.2.3: no such series"):
        assign_roles(candidates, ROLES, sequences, {"T1c": "1.2.3"})
    with pytest.raises(ValueError, match=f"series {first} given for more than one role"):
        assign_roles(candidates, ROLES, sequences, {"T1c": first, "T1": first})


def test_router_logs_the_same_decision_as_assign_roles(state):  # noqa: F811
    """One implementation: the router's ``sequence_selected`` reasons are
    what ``assign_roles`` (and so ``ainode run``) says for the same series."""
    index, spool, sweep = state
    study = generate_uid()
    for role in ("T1", "T1c", "T2"):
        add_series(index, spool, study, role)
    add_series(index, spool, study, "FLAIR", series_time="120000")
    add_series(index, spool, study, "FLAIR", series_time="121500", slices=1)
    with capture_logs() as logs:
        sweep.sweep(later(11))
    logged = {e["role"]: (e["series_uid"], e["reason"]) for e in logs if e["event"] == "sequence_selected"}
    assert set(logged) == set(ROLES)
    assert "latest acquisition (" in logged["FLAIR"][1]

    from node.spool import read_header

    offline = [
        SeriesCandidate(s.series_uid, read_header(index.instance_paths(s.series_uid)[0]), s.instance_count)
        for s in index.study_series(study)
    ]
    roles, decisions = assign_roles(offline, ROLES, load_config(None).sequences)
    assert {d.role: (d.series_uid, d.reason) for d in decisions if d.role} == logged
    assert roles == {role: uid for role, (uid, _) in logged.items()}


def test_run_names_the_missing_role_and_the_series_seen(tmp_path):
    phantom = make_phantom(size=(16, 16, 4), missing="FLAIR", out_dir=tmp_path / "study")
    result = runner.invoke(
        app, ["run", "brain_tumour", str(tmp_path / "study"), "--out", str(tmp_path / "out"), "-c", str(_empty_config(tmp_path))]
    )
    assert result.exit_code == 1, result.output
    assert "roles T1, T1c, T2, FLAIR (pipeline brain_tumour)" in result.stdout
    for role, datasets in phantom.datasets.items():
        uid = datasets[0].SeriesInstanceUID
        assert f"series {uid} '{SEQUENCE_PROTOCOLS[role].series_description}': {role}: {role} rule 1 matched" in result.stdout
        assert f"{uid} '{SEQUENCE_PROTOCOLS[role].series_description}' ({role})" in result.stderr
    assert "missing role FLAIR: no series fills it (name one with --role FLAIR=SERIES_UID)" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


def test_role_override_changes_the_decision(tmp_path):
    """A FLAIR the rules cannot recognise (no description, no Inversion Time)
    looks like a T2 by its TR/TE; ``--role FLAIR=`` makes it the FLAIR. T1 is
    missing, so the run stops after the decisions, before the model loads."""
    phantom = make_phantom(size=(16, 16, 4), missing="T1")
    flair = phantom.datasets["FLAIR"]
    for ds in flair:
        ds.SeriesDescription = "series 4"
        del ds.InversionTime
    for role, datasets in phantom.datasets.items():
        write_series(datasets, tmp_path / "study" / role)
    uid, t2 = flair[0].SeriesInstanceUID, phantom.datasets["T2"][0].SeriesInstanceUID
    base = ["run", "brain_tumour", str(tmp_path / "study"), "--out", str(tmp_path / "out"), "-c", str(_empty_config(tmp_path))]

    by_rules = runner.invoke(app, base)  # the later "T2" wins T2, as in the node
    assert by_rules.exit_code == 1
    assert (
        f"series {uid} 'series 4': T2: T2 rule 2 matched: EchoTime=81, RepetitionTime=9000, InversionTime=(absent); "
        "selected: latest acquisition"
    ) in by_rules.stdout
    assert f"series {t2} 'AX T2 TSE': none: T2 rule 1 matched: SeriesDescription=AX T2 TSE; not selected: {uid} fills T2" in by_rules.stdout
    assert "missing role T1, FLAIR: " in by_rules.stderr

    overridden = runner.invoke(app, [*base, "--role", f"flair={uid}"])
    assert overridden.exit_code == 1
    assert f"series {uid} 'series 4': FLAIR: FLAIR set by override (sequence rules: T2 rule 2 matched:" in overridden.stdout
    assert f"series {t2} 'AX T2 TSE': T2: T2 rule 1 matched: SeriesDescription=AX T2 TSE; selected: only candidate" in overridden.stdout
    assert "missing role T1: " in overridden.stderr
    assert f"{t2} 'AX T2 TSE' (unused, identified as T2)" in by_rules.stderr
    assert f"{uid} 'series 4' (FLAIR)" in overridden.stderr


@pytest.mark.parametrize(
    "pipeline, value, message",
    [
        ("brain_tumour", "T1c", "expected ROLE=SERIES_UID, got 'T1c'"),
        ("brain_tumour", "DWI={t1c}", "unknown role 'DWI'; brain_tumour reads T1, T1c, T2, FLAIR"),
        ("brain_tumour", "T1c=1.2.3", "--role T1c=1.2.3: no such series among the files; series seen:"),
        ("pneumonia", "T1c={t1c}", "pneumonia is a series-level pipeline"),
    ],
)
def test_bad_role_overrides_are_refused(tmp_path, pipeline, value, message):
    phantom = make_phantom(size=(16, 16, 4), out_dir=tmp_path / "study")
    value = value.format(t1c=phantom.datasets["T1c"][0].SeriesInstanceUID)
    result = runner.invoke(
        app, ["run", pipeline, str(tmp_path / "study"), "--role", value, "-c", str(_empty_config(tmp_path)), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())


def test_role_given_twice_and_one_series_for_two_roles(tmp_path):
    phantom = make_phantom(size=(16, 16, 4), out_dir=tmp_path / "study")
    t1c, t2 = (phantom.datasets[r][0].SeriesInstanceUID for r in ("T1c", "T2"))
    base = ["run", "brain_tumour", str(tmp_path / "study"), "-c", str(_empty_config(tmp_path)), "--out", str(tmp_path / "out")]
    twice = runner.invoke(app, [*base, "--role", f"T1c={t1c}", "--role", f"t1c={t2}"])
    assert twice.exit_code == 2 and "T1c given twice" in " ".join(twice.output.replace("│", " ").split())
    shared = runner.invoke(app, [*base, "--role", f"T1c={t1c}", "--role", f"T2={t1c}"])
    assert shared.exit_code == 2 and "given for more than one role" in " ".join(shared.output.replace("│", " ").split())


@pytest.mark.slow
def test_run_on_a_converted_brats_study(tmp_path):
    """The user's path: ``ainode tools nifti-to-dicom``, then ``ainode run``
    on the folder; the route in config/node.toml gives the roles."""
    shared_file(BRATS_CASE / "BraTS-GLI-00001-000-t1c.nii.gz")
    study_dir, out = tmp_path / "study", tmp_path / "out"
    config = str(REPO / "config" / "node.toml")
    converted = runner.invoke(app, ["tools", "nifti-to-dicom", str(BRATS_CASE), "--out", str(study_dir), "-c", config])
    assert converted.exit_code == 0, converted.output
    series = {}
    for path in sorted(study_dir.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series.setdefault(ds.SeriesInstanceUID, ds)
    assert len(series) == 4

    result = runner.invoke(app, ["run", "brain_tumour", str(study_dir), "--out", str(out), "-c", config])
    assert result.exit_code == 0, result.output
    assert "roles T1, T1c, T2, FLAIR (route 'brain-mri-tumour')" in result.stdout
    by_role = {}
    for uid, ds in series.items():
        role = next(r for r, p in SEQUENCE_PROTOCOLS.items() if p.series_description == ds.SeriesDescription)
        assert f"series {uid} '{ds.SeriesDescription}': {role}: {role} rule 1 matched" in result.stdout
        by_role[role] = uid
    written = {p.name.split("_")[0]: p for p in out.glob("*.dcm")}
    assert sorted(written) == ["SEG", "SR"]
    seg = hd.seg.segread(written["SEG"])
    assert [item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence] == [by_role["T1c"]]
    assert seg.StudyInstanceUID == series[by_role["T1c"]].StudyInstanceUID
    assert len(seg.SegmentSequence) == 3  # NCR, ED, ET
    assert "NOT FOR DIAGNOSTIC USE" in pydicom.dcmread(written["SR"]).SeriesDescription
