"""Pipelines as plug-ins (``pipelines/spec.py``, ``pipelines/registry.py``).

A tiny pipeline package is built as a real wheel with an ``ainode.pipelines``
entry point, installed with ``pip --target`` into the test's folder (never
into the shared virtualenv) and put on ``PYTHONPATH``. Then
``ainode pipelines list`` must show it, the configuration must take its
``[pipelines.tiny]`` table, loading the configuration and building the node
must not import torch, and a real node process must route a CT series to it
and deliver its TID 1500 SR to a real Orthanc. The route checks (level,
roles, Modality) and the registry's refusals are tested in-process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from node.config import ConfigError, load_config
from node.orthanc_routing import SECTION, routing_section
from pipelines.registry import discover
from pipelines.spec import Level, PipelineSpec
from tests.dicom_checks import run_dciodvfy
from tests.peers import REPO, NodeProcess, Orthanc, node_sections, require_orthanc, storescu, wait_for, write_node_toml
from tests.test_end_to_end import write_node_config

TINY_PACKAGE = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "tiny-ainode-pipeline"
        version = "0.1"
        dependencies = []

        [project.entry-points."ainode.pipelines"]
        tiny = "tiny_ainode_pipeline.spec:SPEC"

        [tool.setuptools]
        packages = ["tiny_ainode_pipeline"]
    """,
    "tiny_ainode_pipeline/__init__.py": "",
    "tiny_ainode_pipeline/settings.py": """
        from pydantic import BaseModel, ConfigDict, Field


        class TinySettings(BaseModel):
            model_config = ConfigDict(extra="forbid")

            label: str = Field("tiny pipeline ran", description="Tracking Identifier of the SR's measurement group.")
    """,
    "tiny_ainode_pipeline/spec.py": """
        from pipelines.spec import Level, PipelineSpec
        from tiny_ainode_pipeline.settings import TinySettings

        SPEC = PipelineSpec(
            name="tiny",
            pipeline_class="tiny_ainode_pipeline.pipeline:TinyPipeline",
            settings=TinySettings,
            level=Level.SERIES,
            modalities=("CT",),
            description="Mean stored pixel value of a series, as a TID 1500 SR.",
        )
    """,
    "tiny_ainode_pipeline/pipeline.py": """
        import highdicom as hd
        import numpy as np
        from pydicom.sr.codedict import codes
        from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

        MEAN = hd.sr.CodedConcept("MEANPX", "99TINY", "Mean stored pixel value")


        class TinyPipeline:
            name = "tiny"
            level = "series"
            model_version = "0.1"

            def __init__(self, settings, registry, device="cpu"):
                self.settings = settings

            def run(self, study, context):
                [(series_uid, datasets)] = study.series.items()
                mean = float(np.concatenate([ds.pixel_array.ravel() for ds in datasets]).mean())

                def uid(what):
                    return generate_uid(context.uid_prefix or PYDICOM_ROOT_UID, [series_uid, "tiny", what])

                group = hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(uid=uid("group"), identifier=self.settings.label),
                    measurements=[hd.sr.Measurement(name=MEAN, value=mean, unit=hd.sr.CodedConcept("1", "UCUM", "no units"))],
                )
                device = hd.sr.DeviceObserverIdentifyingAttributes(uid=uid("device"), name="tiny")
                report = hd.sr.MeasurementReport(
                    observation_context=hd.sr.ObservationContext(
                        observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device)
                    ),
                    procedure_reported=hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region"),
                    imaging_measurements=[group],
                )
                sr = hd.sr.Comprehensive3DSR(
                    evidence=list(datasets),
                    content=report,
                    series_instance_uid=uid("series"),
                    series_number=901,
                    sop_instance_uid=uid("sr"),
                    instance_number=1,
                    manufacturer=context.manufacturer,
                    series_description="tiny 0.1 NOT FOR DIAGNOSTIC USE",
                    is_complete=True,
                )
                return [sr]
    """,
}

TINY_ROUTE = """
[[routes]]
name = "ct-tiny"
pipeline = "tiny"
destinations = ["pacs"]
match = { Modality = ["CT"] }

[pipelines.tiny]
label = "tiny pipeline ran on this CT"
"""


def _env(pythonpath: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AINODE_")}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), os.environ.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """The tiny pipeline, built as a wheel and installed into a folder of its own."""
    root = tmp_path_factory.mktemp("plugin")
    src, dist, target = root / "src", root / "dist", root / "site"
    for name, text in TINY_PACKAGE.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(textwrap.dedent(text).lstrip())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                           capture_output=True, text=True, timeout=300, cwd=root)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = dist.glob("tiny_ainode_pipeline-0.1-*.whl")
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=300, cwd=root)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (target / "tiny_ainode_pipeline" / "spec.py").is_file()
    return target


def _ainode(args: list[str], pythonpath: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=_env(pythonpath))


def test_pipelines_list_shows_the_entry_point_and_the_built_ins(plugin_path, tmp_path):
    listed = _ainode(["pipelines", "list", "--json"], plugin_path, tmp_path)
    assert listed.returncode == 0, listed.stderr
    by_name = {p["name"]: p for p in json.loads(listed.stdout)["pipelines"]}
    tiny = by_name["tiny"]
    assert (tiny["origin"], tiny["level"], tiny["modalities"], tiny["required_roles"]) == ("entry point", "series", ["CT"], [])
    assert tiny["source"] == "tiny-ainode-pipeline 0.1: tiny = tiny_ainode_pipeline.spec:SPEC"
    assert tiny["class"] == "tiny_ainode_pipeline.pipeline:TinyPipeline"
    assert tiny["settings"] == [{
        "field": "label", "type": "str", "default": "tiny pipeline ran",
        "description": "Tracking Identifier of the SR's measurement group.",
    }]
    assert by_name["pneumonia"]["origin"] == by_name["brain_tumour"]["origin"] == "built-in"
    assert by_name["brain_tumour"]["required_roles"] == ["T1", "T1c", "T2", "FLAIR"]
    assert by_name["brain_tumour"]["level"] == "study"

    text = _ainode(["pipelines", "list"], plugin_path, tmp_path)
    assert text.returncode == 0, text.stderr
    assert "tiny  (entry point: tiny-ainode-pipeline 0.1: tiny = tiny_ainode_pipeline.spec:SPEC)" in text.stdout
    assert "    label: str = \"tiny pipeline ran\"  Tracking Identifier" in text.stdout

    # Control: without the plug-in on the path, no tiny.
    without = _ainode(["pipelines", "list", "--json"], None, tmp_path)
    assert without.returncode == 0, without.stderr
    assert "tiny" not in {p["name"] for p in json.loads(without.stdout)["pipelines"]}


_NO_TORCH = """
import json, sys
from node.config import load_config
from node.service import Node

cfg = load_config(sys.argv[1])
node = Node(cfg)
node.index.close()
print(json.dumps({
    "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
    "pipeline_modules": sorted(m for m in sys.modules if m.endswith(".pipeline")),
    "tiny": cfg.pipelines.tiny.model_dump(),
    "pneumonia": cfg.pipelines.pneumonia.model_dump(),
}))
"""


def test_config_and_node_take_the_plugin_without_importing_torch(plugin_path, tmp_path):
    sections = node_sections(
        tmp_path,
        destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}},
        api={"enabled": False},
    )
    config = write_node_toml(tmp_path / "node.toml", sections, TINY_ROUTE)
    run = subprocess.run([sys.executable, "-c", _NO_TORCH, str(config)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env=_env(plugin_path))
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])  # structlog unconfigured writes to stdout
    assert seen["torch"] == [], "loading the configuration and building the node must not import torch"
    assert seen["pipeline_modules"] == [], "no pipeline class may be imported before a job needs it"
    assert seen["tiny"] == {"label": "tiny pipeline ran on this CT", "intended_use": {"default": "warn", "rules": {}}}
    assert seen["pneumonia"]["model"] == "pneumonia-densenet121-demo"

    # Without the plug-in the same file is refused, naming what is registered.
    check = _ainode(["config", "check", str(config)], None, tmp_path)
    assert check.returncode == 2
    assert re.search(r"pipelines: \[pipelines\.tiny\]: unknown pipeline 'tiny'; registered: .*pneumonia", check.stderr), check.stderr
    config.write_text(config.read_text().replace('[pipelines.tiny]\nlabel = "tiny pipeline ran on this CT"\n', ""))
    check = _ainode(["config", "check", str(config)], None, tmp_path)
    assert check.returncode == 2
    assert re.search(r"routes\[0\] \(ct-tiny\)\.pipeline: unknown pipeline 'tiny'; registered: .*pneumonia", check.stderr), check.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_a_node_runs_the_plugin_and_orthanc_receives_its_sr(plugin_path, tmp_path, dcmtk):
    require_orthanc()
    orthanc = Orthanc(tmp_path / "orthanc").start()
    config, ports = write_node_config(tmp_path, orthanc, "dicom", routes=TINY_ROUTE)
    node = NodeProcess(config, tmp_path, env={"PYTHONPATH": _env(plugin_path)["PYTHONPATH"]})
    try:
        node.start(ports["api"])
        source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        source.StudyInstanceUID, source.SeriesInstanceUID = generate_uid(), generate_uid()
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / "ct.dcm"
        source.save_as(path, enforce_file_format=True)
        sent = storescu([path], ports["node"], "AINODE")
        assert sent.returncode == 0, sent.stdout + sent.stderr

        [[sr_id]] = wait_for(lambda: orthanc.series_instances(source.StudyInstanceUID, Modality="SR"), 120, 0.2,
                             "the tiny pipeline's SR in Orthanc")
        stored = pydicom.dcmread(BytesIO(orthanc.file(sr_id)))
        checked = run_dciodvfy(stored, tmp_path, name="tiny-sr.dcm")
        assert (checked.errors, checked.iod) == ([], "Comprehensive3DSR"), checked
        sr = hd.sr.srread(BytesIO(orthanc.file(sr_id)))
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage (PS3.4 B.5)
        [group] = sr.content.get_image_measurement_groups()
        assert group.tracking_identifier == "tiny pipeline ran on this CT"  # from [pipelines.tiny]
        [measurement] = group.get_measurements()
        assert measurement.name.meaning == "Mean stored pixel value"
        assert measurement.value == pytest.approx(float(source.pixel_array.mean()))
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        done = [e for e in node.log_lines() if e.get("event") == "job_done"]
        assert [e["pipeline"] for e in done] == ["tiny"], done
    finally:
        node.stop()
        orthanc.stop()


# --- the route checks against the spec, in-process ------------------------------------------

_DESTINATION = '[destinations.pacs]\nkind = "dicom"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n'
_CXR = '[[routes]]\nname = "cxr"\npipeline = "pneumonia"\ndestinations = ["pacs"]\nmatch = { Modality = ["CR", "DX"] }\n'


def _load(tmp_path: Path, text: str):
    path = tmp_path / "node.toml"
    path.write_text(_DESTINATION + text)
    return load_config(path)


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ('pipeline = "brain_tumour"\nmatch = { Modality = ["MR"] }',
         'routes[1] (brain-mri-tumour): pipeline brain_tumour is study-level; level "series" given'),
        ('pipeline = "pneumonia"\nlevel = "study"\nrequired_roles = ["T1"]',
         'routes[1] (brain-mri-tumour): pipeline pneumonia is series-level; level "study" given'),
        ('pipeline = "brain_tumour"\nlevel = "study"\nrequired_roles = ["T1", "T1c", "T2"]',
         "routes[1] (brain-mri-tumour).required_roles: pipeline brain_tumour reads T1, T1c, T2, FLAIR; missing FLAIR"),
        ('pipeline = "brain_tumour"\nlevel = "study"\nrequired_roles = ["T1", "T1c", "T2", "FLAIR", "SWI"]\n'
         '[sequences]\nT1 = [{ SeriesDescription = "t1" }]\nT1c = [{ SeriesDescription = "t1c" }]\n'
         'T2 = [{ SeriesDescription = "t2" }]\nFLAIR = [{ SeriesDescription = "flair" }]\nSWI = [{ SeriesDescription = "swi" }]',
         "routes[1] (brain-mri-tumour).required_roles: pipeline brain_tumour reads T1, T1c, T2, FLAIR; it does not read SWI"),
        ('pipeline = "nope"', "routes[1] (brain-mri-tumour).pipeline: unknown pipeline 'nope'; registered: "),
    ],
)
def test_a_route_must_fit_its_pipeline(tmp_path, route, message):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, _CXR + f'[[routes]]\nname = "brain-mri-tumour"\ndestinations = ["pacs"]\n{route}\n')
    assert message in str(err.value)


def test_routes_that_fit_load_and_a_foreign_modality_is_warned(tmp_path):
    cfg = _load(tmp_path, _CXR + '[[routes]]\nname = "brain"\npipeline = "brain_tumour"\nlevel = "study"\n'
                'destinations = ["pacs"]\nrequired_roles = ["FLAIR", "T2", "T1c", "T1"]\nmatch = { Modality = ["MR"] }\n')
    assert cfg.warnings == []
    cfg = _load(tmp_path, '[[routes]]\nname = "cxr-ct"\npipeline = "pneumonia"\ndestinations = ["pacs"]\n'
                'match = { Modality = ["CR", "ct"] }\n')
    assert cfg.warnings == ["routes[0] (cxr-ct).match.Modality: pipeline pneumonia accepts CR, DX; 'ct' will reach it "
                            "and be refused or fail"]


def test_pipeline_settings_come_from_the_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("AINODE_PIPELINES__PNEUMONIA__CAM_THRESHOLD", "0.25")
    cfg = _load(tmp_path, '[pipelines.brain_tumour]\nskull_strip = "never"\n')
    assert cfg.pipelines.pneumonia.cam_threshold == 0.25
    assert cfg.pipelines.brain_tumour.skull_strip == "never"
    assert set(type(cfg.pipelines).model_fields) == set(discover().names())
    with pytest.raises(ConfigError, match=r"pipelines: \[pipelines\.nope\]: unknown pipeline 'nope'; registered: "):
        _load(tmp_path, "[pipelines.nope]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"pipelines\.brain_tumour\.skull_strip"):
        _load(tmp_path, '[pipelines.brain_tumour]\nskull_strip = "sometimes"\n')


# --- the spec and the registry ----------------------------------------------------------------


def test_built_ins_are_found_by_their_spec_module():
    reg = discover()
    assert reg.errors == ()
    for name in ("pneumonia", "brain_tumour"):
        assert (reg.pipelines[name].origin, reg.pipelines[name].source) == ("built-in", f"pipelines.{name}.spec")
    assert reg.spec("brain_tumour").level is Level.STUDY
    assert reg.spec("pneumonia").load_class().__name__ == "PneumoniaPipeline"


@pytest.mark.parametrize(
    ("kwargs", "attribute"),
    [
        ({"name": "Tiny-1"}, "PipelineSpec.name"),
        ({"pipeline_class": "tiny.pipeline.TinyPipeline"}, "PipelineSpec.pipeline_class"),
        ({"settings": dict}, "PipelineSpec.settings"),
        ({"level": "patient"}, "PipelineSpec.level"),
        ({"level": "study"}, "PipelineSpec.required_roles"),
        ({"required_roles": ("T1",)}, "PipelineSpec.required_roles"),
        ({"modalities": ("ct",)}, "PipelineSpec.modalities"),
    ],
)
def test_a_malformed_spec_is_refused_naming_the_attribute(kwargs, attribute):
    from pipelines.pneumonia.settings import PneumoniaSettings

    args = {"name": "tiny", "pipeline_class": "tiny.pipeline:TinyPipeline", "settings": PneumoniaSettings} | kwargs
    with pytest.raises(ValueError, match=re.escape(attribute)):
        PipelineSpec(**args)


def test_settings_without_defaults_are_refused():
    from pydantic import BaseModel

    class NoDefault(BaseModel):
        model: str

    with pytest.raises(ValueError, match=r"PipelineSpec\.settings: NoDefault needs a default for every field"):
        PipelineSpec(name="tiny", pipeline_class="m:C", settings=NoDefault)


def test_broken_entry_points_are_reported_not_registered(tmp_path, monkeypatch):
    """Real distribution metadata on sys.path (importlib.metadata reads it):
    each faulty entry point is reported with its distribution, the good ones stay."""
    info = tmp_path / "broken_plugins-0.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.2\n")
    (info / "entry_points.txt").write_text(
        "[ainode.pipelines]\n"
        "missing = no_such_module_xyz.spec:SPEC\n"
        "notaspec = json:dumps\n"
        "pneumonia = pipelines.pneumonia.spec:SPEC\n"
        "renamed = pipelines.brain_tumour.spec:SPEC\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = discover()
    assert {"pneumonia", "brain_tumour"} <= set(reg.names()) and "missing" not in reg
    errors = "\n".join(reg.errors)
    assert "entry point broken-plugins 0.2: missing = no_such_module_xyz.spec:SPEC: cannot load: ModuleNotFoundError" in errors
    assert "notaspec = json:dumps: expected a pipelines.spec.PipelineSpec, got function" in errors
    assert "pneumonia = pipelines.pneumonia.spec:SPEC: pipeline 'pneumonia' is already registered by pipelines.pneumonia.spec" in errors
    assert "renamed = pipelines.brain_tumour.spec:SPEC: the spec is named 'brain_tumour', expected 'renamed'" in errors
    assert "not registered: " in reg.unknown("missing") and "no_such_module_xyz" in reg.unknown("missing")


# --- Orthanc's routing rules ---------------------------------------------------------------------


def test_shipped_orthanc_routing_is_made_from_the_shipped_routes():
    """deploy/orthanc/orthanc.json's AinodeRouting is what `ainode orthanc-routing`
    makes of config/node.toml, so autoroute.lua forwards what the routes take."""
    text = (REPO / "deploy" / "orthanc" / "orthanc.json").read_text()
    start = text.index(f'"{SECTION}"')
    shipped, _ = json.JSONDecoder().raw_decode(text, text.index("{", start))
    generated = routing_section(load_config(REPO / "config" / "node.toml"))[SECTION]
    assert shipped == generated


def test_orthanc_routing_keeps_only_what_lua_can_check(tmp_path):
    cfg = _load(tmp_path, '[[routes]]\nname = "cxr"\npipeline = "pneumonia"\ndestinations = ["pacs"]\n'
                'match = { Modality = ["cr", "DX"], SeriesDescription = "(?i)pa", SOPClassUID = ["1.2.3"], '
                'Rows = { min = 512 } }\n')
    [rule] = routing_section(cfg)[SECTION]["Series"]
    assert rule == {
        "Route": "cxr", "Pipeline": "pneumonia", "Match": {"Modality": ["CR", "DX"]},
        "Unchecked": ["SeriesDescription (not a list of values)", "SOPClassUID (not an Orthanc series tag)",
                      "Rows (not an Orthanc series tag)"],
    }
