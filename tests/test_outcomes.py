"""Job outcomes an operator can act on: ``not_applicable`` apart from
``failed``, input faults without a traceback, bugs with one.

The node is the real one (SCP, sweep, router, runner with the pneumonia demo
model); the modality is an in-process pynetdicom SCU.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SegmentationStorage,
    generate_uid,
)
from pynetdicom import AE

from node.config import load_config
from node.index import JobState
from node.service import Node, status_report
from pipelines.base import PipelineContext, PipelineInputError, PipelineNotApplicable, Study
from pipelines.pneumonia.preprocess import dicom_to_image
from tests.peers import free_port, wait_for
from tests.test_dispatch import StoreSCP

#: A rule as broad as some sites write them: every chest object, whatever it is.
BROAD_RULE = {"name": "chest", "pipeline": "pneumonia", "destinations": ["pacs"], "match": {"BodyPartExamined": ["CHEST"]}}


def small_cr(rows: int = 64, columns: int = 64, **changes) -> Dataset:
    """A small synthetic frontal chest CR (12-bit MONOCHROME2, 0.5 mm pixels),
    its own study and series; ``changes`` set or override attributes."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:rows, 0:columns]
    pixels = (1000 + 20 * yy + 10 * xx + rng.integers(0, 200, (rows, columns))).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Outcome", "OUT1", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20250101", "120000", "1", "A1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.PatientOrientation = ["L", "F"]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = pixels.tobytes()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def rgb_cr() -> Dataset:
    ds = small_cr()
    rgb = np.repeat(np.frombuffer(ds.PixelData, np.uint16).reshape(64, 64)[..., None] // 16, 3, axis=2).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    return ds


def multiframe_cr() -> Dataset:
    ds = small_cr()
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    return ds


def seg_object() -> Dataset:
    """A SEG some earlier system made, tagged CHEST: a broad rule routes it."""
    ds = small_cr()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.Modality, ds.SegmentationType = "SEG", "BINARY"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.NumberOfFrames = 1, 1, 0, 1
    ds.PixelData = np.packbits(np.ones(64 * 64, np.uint8), bitorder="little").tobytes()
    del ds.ViewPosition, ds.PixelSpacing
    return ds


def ct_localizer() -> Dataset:
    ds = small_cr(Modality="CT", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    return ds


def send(cfg, *datasets: Dataset) -> list[int]:
    """C-STORE ``datasets`` to the node on one association, then release it."""
    ae = AE(ae_title="MODALITY")
    for sop_class in dict.fromkeys(ds.SOPClassUID for ds in datasets):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


@pytest.fixture
def node(node_config):
    pacs = StoreSCP(free_port()).start()
    cfg = node_config(
        node={"bind_address": "127.0.0.1", "port": free_port()},
        storage={"fsync": False},
        completion={"sweep_interval_seconds": 0.2, "series_idle_seconds": 30, "complete_on_release": True},
        routes=[BROAD_RULE],
        destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}},
        retry={"initial_delay_seconds": 0.2, "max_delay_seconds": 1},
        api={"enabled": False},
    )
    n = Node(cfg)
    n.start()
    yield n, pacs, cfg
    n.stop()
    pacs.stop()


def job_of(node: Node, series_uid: str):
    return next((j for j in node.index.jobs(200) if j.series_uid == series_uid), None)


def finished(node: Node, series_uid: str):
    job = job_of(node, series_uid)
    return job if job is not None and job.state not in (JobState.QUEUED, JobState.RUNNING) else None


def test_valid_series_the_pipeline_does_not_read_end_not_applicable(node):
    """(A lateral view is the intended-use guard's to decide: tests/test_guardrails.py.)"""
    n, pacs, cfg = node
    cases = {
        "colour": (rgb_cr(), "colour image (Samples per Pixel 3, Photometric Interpretation RGB)"),
        "multi-frame": (multiframe_cr(), "2 frames; a radiograph has one"),
        "SEG": (seg_object(), "Modality SEG is not CR or DX"),
        "localizer": (ct_localizer(), "Modality CT is not CR or DX"),
    }
    for ds, _ in cases.values():
        assert send(cfg, ds) == [0x0000]
    good = small_cr()
    assert send(cfg, good) == [0x0000]

    for name, (ds, reason) in cases.items():
        job = wait_for(lambda uid=ds.SeriesInstanceUID: finished(n, uid), 60, what=f"{name} job")
        assert job.state == JobState.NOT_APPLICABLE, (name, job.state, job.error)
        assert reason in job.error, (name, job.error)
        assert job.traceback is None
        assert n.index.series_info(ds.SeriesInstanceUID).state == JobState.NOT_APPLICABLE
    done = wait_for(lambda: finished(n, good.SeriesInstanceUID), 60, what="the frontal CR's job")
    assert done.state == JobState.DONE, done.error
    wait_for(lambda: len(pacs.received) == 2, 30, what="SEG and SR of the frontal CR at the PACS")

    counts = status_report(n.index)["counts"]
    assert counts["jobs"] == {"not_applicable": len(cases), "done": 1}
    assert n.index.deliveries(100) and all(d.job_id == done.id for d in n.index.deliveries(100))
    sample = n.metrics.registry.get_sample_value
    assert sample("ainode_jobs_total", {"pipeline": "pneumonia", "state": "not_applicable"}) == len(cases)
    assert sample("ainode_jobs_total", {"pipeline": "pneumonia", "state": "failed"}) == 0  # declared at 0, never counted


def test_zero_length_pixel_data_fails_with_a_clear_input_error(node):
    n, _, cfg = node
    empty = small_cr(PixelData=b"")
    assert send(cfg, empty) == [0x0000]
    job = wait_for(lambda: finished(n, empty.SeriesInstanceUID), 60, what="the job")
    assert job.state == JobState.FAILED
    assert "Pixel Data (7FE0,0010) is empty" in job.error
    assert job.traceback is None and "TypeError" not in job.error
    assert n.metrics.registry.get_sample_value("ainode_jobs_total", {"pipeline": "pneumonia", "state": "failed"}) == 1


def test_zero_length_pixel_data_is_named_by_preprocessing():
    with pytest.raises(ValueError, match=r"PixelData \(7FE0,0010\) is empty"):
        dicom_to_image(small_cr(PixelData=b""))


@pytest.fixture(scope="module")
def pneumonia():
    from node.run import PipelineCache

    return PipelineCache(load_config(None, worker={"device": "cpu"})).get("pneumonia")


def study_of(*datasets: Dataset) -> Study:
    ds = datasets[0]
    for other in datasets:
        other.StudyInstanceUID, other.SeriesInstanceUID = ds.StudyInstanceUID, ds.SeriesInstanceUID
    return Study(ds.StudyInstanceUID, {ds.SeriesInstanceUID: list(datasets)})


def test_a_faulty_image_beside_not_applicable_ones_is_a_fault(pneumonia):
    lateral, empty = small_cr(ViewPosition="RL"), small_cr(PixelData=b"")
    with pytest.raises(PipelineInputError, match=r"Pixel Data \(7FE0,0010\) is empty"):
        pneumonia.run(study_of(lateral, empty), PipelineContext())
    with pytest.raises(PipelineNotApplicable, match="lateral view"):
        pneumonia.run(study_of(small_cr(ViewPosition="RL")), PipelineContext())
    with pytest.raises(PipelineNotApplicable, match=r"lateral view \(View Position LATERAL\)"):
        pneumonia.run(study_of(small_cr(ViewPosition="LATERAL")), PipelineContext())
    # Let through by the guard with a warning (the card's frontal_view rule): read, the SR says so.
    warned = PipelineContext(intended_use_warnings=("frontal_view (a frontal view): ViewPosition=LL",))
    results = pneumonia.run(study_of(small_cr(ViewPosition="LL")), warned)
    assert [r.Modality for r in results] == ["SEG", "SR"]
    assert "OUT OF INTENDED USE" in results[1].SeriesDescription
    # A lateral view beside a frontal one: the frontal one is read, the lateral skipped.
    results = pneumonia.run(study_of(small_cr(), small_cr(ViewPosition="LL")), PipelineContext())
    assert [r.Modality for r in results] == ["SEG", "SR"]


def test_a_writer_bug_is_not_an_input_error(pneumonia, monkeypatch):
    import pipelines.pneumonia.pipeline as module

    def broken_writer(*args, **kwargs):
        raise ValueError("mask has shape (1, 1), expected (Rows, Columns)")  # as a writer bug would

    monkeypatch.setattr(module, "write_seg", broken_writer)
    with pytest.raises(ValueError) as caught:
        pneumonia.run(study_of(small_cr()), PipelineContext())
    assert not isinstance(caught.value, PipelineInputError)


def test_an_unusable_source_attribute_is_an_input_error(pneumonia):
    bad = small_cr()
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        bad.StudyInstanceUID = "1.2.3.abc"  # not a UID: the SEG cannot reference it
    with pytest.raises(PipelineInputError, match="StudyInstanceUID of the source image is invalid"):
        pneumonia.run(Study(bad.StudyInstanceUID, {bad.SeriesInstanceUID: [bad]}), PipelineContext())


def test_brain_pipeline_refuses_a_non_mr_role_as_not_applicable():
    from pipelines.brain_tumour.pipeline import BrainTumourPipeline

    ct = {role: small_cr(Modality="CT", SOPClassUID=CTImageStorage) for role in ("T1", "T1c", "T2", "FLAIR")}
    study_uid = ct["T1"].StudyInstanceUID
    for ds in ct.values():
        ds.StudyInstanceUID = study_uid
    study = Study(study_uid, {ds.SeriesInstanceUID: [ds] for ds in ct.values()}, {r: d.SeriesInstanceUID for r, d in ct.items()})
    from models.registry import ModelRegistry
    from pipelines.brain_tumour.settings import BrainTumourSettings

    pipeline = BrainTumourPipeline(BrainTumourSettings(), ModelRegistry())  # the demo weights
    with pytest.raises(PipelineNotApplicable, match="T1 is Modality CT"):
        pipeline.run(study, PipelineContext())
