"""The node's results reviewed in OHIF, in a real (headless) browser.

Everything is real: Orthanc runs ``deploy/orthanc/`` (auto-routing to the
node), the node runs its pipeline, ``deploy/ohif/viewer.py`` serves the OHIF
dist (``make viewer-deps``) with ``deploy/ohif/app-config.js`` and proxies
``/dicom-web`` to that Orthanc, and Playwright drives Debian's Chromium.

For each case the source is stored into Orthanc; the SEG and SR come back by
themselves. Then, as a radiologist would, the test opens the study in OHIF:

- SEG: the overlay must be drawn where the mask is. The mask (decoded with
  pydicom from the SEG as Orthanc holds it) is mapped to screen pixels with
  the viewport's own image-to-canvas transform; coloured pixels are counted
  on screenshots without and with the SEG (the radiograph is grey, the
  overlay is not). A case whose SEG OHIF 3.13.2 cannot draw for a known,
  documented reason (:class:`Limitation`) asserts that reason instead.
- SR: its measurements (probability and threshold) must be listed, and the
  outline drawn on the radiograph (OHIF 3.13.2 may miss the render that
  draws them: see :meth:`Viewer.wait_for_sr_annotation`).

``test_pixel_check_tells_right_from_wrong`` shows that the check can fail: a
copy of the SEG flipped (or transposed) lands (almost) nowhere on the mask,
and one whose Plane Orientation is derived from Patient Orientation is
refused by OHIF, which is why the node writes the pixel grid's identity.

Screenshots and figures go to ``test-artifacts/ohif/``. A case is a
:class:`Case`; the brain MRI pipeline adds one (several series, the check
then goes to the slice with the most foreground).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.uid import generate_uid
from scipy import ndimage
from skimage import measure

from tests.conftest import CXR_RSNA, shared_file
from tests.peers import REPO, SHARED_DATA, DeployedOrthanc, NodeProcess, free_port, require_orthanc, wait_for
from tests.test_end_to_end import BRAIN_ROUTE, CXR_ROUTE, derived_in_orthanc, write_node_config
from tests.test_pneumonia_write import grid_geometry, largest_region, segment_frames

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VIEWER = REPO / "deploy" / "ohif" / "viewer.py"
OHIF_VERSION = (REPO / "deploy" / "ohif" / "ohif-version").read_text().strip()
OHIF_DIST = REPO / ".cache" / "ohif" / OHIF_VERSION / "dist"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
]
ARTIFACTS = REPO / "test-artifacts" / "ohif"
BRATS_CASE = SHARED_DATA / "brats" / "BraTS-GLI-00001-000"

# A pixel is "coloured" when its channels differ by more than this (0-255):
# the radiograph is grey (R = G = B), the SEG overlay is not.
CHROMA = 40
# Screen pixels within this many pixels of the mask's edge are not judged:
# the outline and the resampling blur the edge.
EDGE = 3
MIN_COVERAGE = 0.90  # of the mask's screen footprint, coloured
MIN_PRECISION = 0.90  # of the coloured pixels, on the footprint
# The SR's outline is dashed: judged every PATH_STEP screen pixels along its
# path, drawn where a coloured pixel is within PATH_RADIUS.
PATH_STEP = 5
PATH_RADIUS = 6
MIN_OUTLINE_COVERAGE = 0.90
MIN_OUTLINE_PRECISION = 0.90
# Seconds an opened SR is given to be drawn before the test asks cornerstone
# for an annotation render (Viewer.wait_for_sr_annotation says why).
SR_UNPROMPTED = 5


# --- cases -------------------------------------------------------------------------


def _rg1_uncr_without_pixel_spacing(tmp: Path) -> list[Path]:
    """RG1_UNCR.dcm (pydicom-data) without its invalid Pixel Spacing ``0\\0``.

    OHIF 3.13 draws the untouched file black: a zero spacing gives its camera
    a NaN scale (a source problem, not ours). Without the attribute OHIF
    draws the image at an assumed spacing, but the file then has no valid
    spacing at all (no Imager Pixel Spacing either), and the node's SEG
    states none: see :data:`NO_SPACING`. New UIDs, so that it is a study of
    its own.
    """
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    del ds.PixelSpacing
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, generate_uid(entropy_srcs=[str(ds[keyword].value), "valid geometry"]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp / "rg1_uncr_without_pixel_spacing.dcm"
    ds.save_as(path)
    return [path]


def _rsna_cxr(tmp: Path) -> list[Path]:
    """The RSNA-style file as it is: Secondary Capture with Modality CR, Pixel
    Spacing 0.168 mm, no Frame of Reference (../shared/data)."""
    return [shared_file(CXR_RSNA)]


@dataclass(frozen=True)
class Limitation:
    """Why OHIF cannot draw a case's SEG although the node wrote it correctly.

    ``ohif_error`` is a regular expression for the error OHIF shows; the
    test asserts that OHIF fails exactly so (if a later OHIF draws the SEG,
    the test fails and says the limitation is gone).
    """

    why: str
    ohif_error: str


NO_SPACING = Limitation(
    why=(
        "the source states no valid pixel spacing (no Pixel Spacing, no Imager Pixel Spacing), so the SEG "
        "states none either: no Pixel Measures, and then no Plane Orientation (docs/architecture.md). OHIF "
        "3.13.2 cannot open a SEG without Pixel Measures; the SR, in pixel coordinates, is unaffected"
    ),
    ohif_error=r"Cannot destructure property 'SpacingBetweenSlices' of .*PixelMeasures",
)


@dataclass(frozen=True)
class SRShows:
    """What OHIF must show of an SR: ``listed`` texts, and an outline on
    ``source_uid`` around ``region`` (``bool``, the source's Rows x Columns)."""

    listed: list[str]
    source_uid: str
    region: np.ndarray


def _pneumonia_sr_shows(study: Study) -> SRShows:
    """The pneumonia SR's one TID 1410 group: "Probability: 0.43 {probability}"
    and the threshold listed (OHIF: "<concept>: <value to 2 places> <unit
    code>"), the outline around the SEG's largest region (decoded from the
    SEG, not from the SR), or around the whole image when the SEG is empty."""
    [group] = study.sr.content.get_planar_roi_measurement_groups()
    values = {m.name.meaning: m for m in group.get_measurements()}
    listed = [f"{name}: {values[name].value:.2f} {{probability}}" for name in ("Probability", "Threshold Value")]
    source_uid = group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    [mask] = [m for uid, _, m in segment_frames(study.seg) if uid == source_uid]
    return SRShows(listed, source_uid, largest_region(mask) if mask.any() else np.ones(mask.shape, bool))


def _brats_mri(tmp: Path) -> list[Path]:
    """The real BraTS 2023 case BraTS-GLI-00001-000 (../shared/data, never
    seen by the demonstration model) as a four-series MR study, converted by
    the node's own ``nifti-to-dicom``: 4 x 155 slices of 240 x 240."""
    from pipelines.brain_tumour.convert import nifti_to_dicom

    case = BRATS_CASE
    shared_file(case / "BraTS-GLI-00001-000-t1c.nii.gz")
    study = nifti_to_dicom(case, tmp / "brats", patient_name="BraTS^GLI00001", patient_id="BRATS-GLI-00001-000")
    return [path for series in study.series.values() for path in series.paths]


@dataclass(frozen=True)
class Case:
    name: str
    sources: Callable[[Path], list[Path]]  # files a modality sends to Orthanc
    results_timeout: float = 120  # source stored -> SEG and SR in Orthanc
    seg_limitation: Limitation | None = None  # None: OHIF must draw the SEG
    sr_shows: Callable[[Study], SRShows] | None = _pneumonia_sr_shows  # None: see sr_limitation
    sr_limitation: Limitation | None = None


BRAIN_SR = Limitation(
    why=(
        "the brain tumour SR is a TID 1500 volumetric report: TID 1411 groups that reference the SEG's segments "
        "and TID 1501 groups for TC and WT, none with spatial coordinates (the standard form for the volumes of a "
        "segmentation, which the issue asks for). OHIF 3.13.2's SR viewport expects every measurement group to "
        "have image coordinates (OHIF/Viewers #3390) and fails on these; the volumes are read by any TID 1500 "
        "reader (highdicom, dcmtk dsrdump), and the SEG, which OHIF draws, carries the regions"
    ),
    ohif_error=r"Cannot read properties of undefined \(reading 'ReferencedSOPSequence'\)",
)

CASES = [
    Case("rg1_uncr_without_pixel_spacing", _rg1_uncr_without_pixel_spacing, seg_limitation=NO_SPACING),
    Case("rsna_cxr", _rsna_cxr),
    Case("brats_mri", _brats_mri, results_timeout=600, sr_shows=None, sr_limitation=BRAIN_SR),
]
DRAWN = [case for case in CASES if case.seg_limitation is None]
LIMITED = [case for case in CASES if case.seg_limitation is not None]
SR_SHOWN = [case for case in CASES if case.sr_shows is not None]
SR_LIMITED = [case for case in CASES if case.sr_limitation is not None]


# --- the stack: Orthanc (deploy/orthanc) -> node -> Orthanc -> viewer -> Chromium ---------


def _require_browser_stack():
    """Fail, naming the set-up step, when something the test needs is absent."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is required: apt-get install chromium (make browser-deps)")
    if not (OHIF_DIST / "index.html").exists():
        pytest.fail(f"the OHIF viewer is not in {OHIF_DIST}: run make viewer-deps")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the Python package playwright is required (pip install -e '.[test]')")
    require_orthanc()


@dataclass
class Stack:
    pacs: DeployedOrthanc
    node: NodeProcess
    viewer_url: str
    browser: object
    workdir: Path
    studies: dict  # case name -> Study
    figures: dict  # figure name -> overlay figures already measured


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    _require_browser_stack()
    from playwright.sync_api import sync_playwright

    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # no stale screenshots
    ARTIFACTS.mkdir(parents=True)
    workdir = tmp_path_factory.mktemp("ohif")
    pacs = DeployedOrthanc(workdir / "orthanc", node_port=0)
    config, ports = write_node_config(workdir, pacs, "dicom", routes=CXR_ROUTE + BRAIN_ROUTE)
    pacs.env["ORTHANC_NODE_PORT"] = str(ports["node"])
    node = NodeProcess(config, workdir)
    viewer = None
    playwright = sync_playwright().start()
    try:
        pacs.start()
        node.start(ports["api"])
        viewer_url = f"http://127.0.0.1:{free_port()}"
        viewer = subprocess.Popen(
            [sys.executable, str(VIEWER), "--dist", str(OHIF_DIST), "--orthanc", pacs.url,
             "--port", viewer_url.rsplit(":", 1)[1], "--quiet"],
            stdout=open(workdir / "viewer.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: requests.get(f"{viewer_url}/dicom-web/studies", timeout=2).ok, 30, what="viewer proxy")
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield Stack(pacs, node, viewer_url, browser, workdir, {}, {})
        browser.close()
    finally:
        playwright.stop()
        if viewer is not None:
            viewer.terminate()
            viewer.wait(10)
        node.stop()
        pacs.stop()


@dataclass
class Study:
    uid: str
    sources: list[pydicom.Dataset]  # headers of what was stored
    seg_bytes: bytes
    sr_bytes: bytes

    @property
    def seg(self) -> pydicom.Dataset:
        # pydicom, not highdicom: segread cannot read a radiograph SEG's
        # Pixel Measures (no Slice Thickness), see tests/test_pneumonia_write.
        return pydicom.dcmread(BytesIO(self.seg_bytes))

    @property
    def sr(self) -> hd.sr.Comprehensive3DSR:
        return hd.sr.srread(BytesIO(self.sr_bytes))


def processed(stack: Stack, case: Case) -> Study:
    """Store the case's sources into Orthanc; wait for the auto-routed results."""
    if case.name in stack.studies:
        return stack.studies[case.name]
    files = case.sources(stack.workdir)
    for path in files:
        stack.pacs.store(path)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    uid = headers[0].StudyInstanceUID
    found = wait_for(
        lambda: (d := derived_in_orthanc(stack.pacs, uid)) and len(d) == 2 and d,
        case.results_timeout, 0.2, f"SEG and SR of {case.name} in Orthanc",
    )
    study = Study(uid, headers, stack.pacs.file(found["SEG"][0]), stack.pacs.file(found["SR"][0]))
    (ARTIFACTS / f"{case.name}-SEG.dcm").write_bytes(study.seg_bytes)  # as the viewer got them
    (ARTIFACTS / f"{case.name}-SR.dcm").write_bytes(study.sr_bytes)
    stack.studies[case.name] = study
    return study


# --- driving OHIF ------------------------------------------------------------------------


class Viewer:
    """One OHIF page on one study, with the page's uncaught errors collected."""

    def __init__(self, stack: Stack, study_uid: str, name: str):
        self.name = name  # of the screenshots
        self.page = stack.browser.new_page(viewport={"width": 1400, "height": 900})
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self.errors.append(f"HTTP {r.status}: {r.url}"))
        self.page.goto(f"{stack.viewer_url}/viewer?StudyInstanceUIDs={study_uid}")
        self.page.wait_for_selector('[data-cy="viewport-overlay-bottom-right"]', timeout=60_000)
        self.page.get_by_text("Skip all").click()  # the tour
        self.page.get_by_text("Confirm and hide").click()  # "for investigational use only"

    def close(self) -> None:
        self.page.close()

    def thumbnail(self, description: str, series_number: int):
        """A derived series' thumbnail, by its Series Description; it must be
        listed with its Series Number (ours are 9801 and up)."""
        thumb = self.page.locator('[data-cy="study-browser-thumbnail-no-image"]', has_text=description)
        thumb.wait_for(timeout=45_000)
        assert f"S:{series_number}" in thumb.inner_text(), thumb.inner_text()
        return thumb

    def crashed(self) -> str | None:
        """OHIF's error boundary ("Something went wrong"): the exception it
        shows under "Show Details", and the page's errors."""
        if not self.page.get_by_text("Something went wrong").count():
            return None
        details = self.page.get_by_text("Show Details")
        if details.count():
            details.first.click()
            self.page.wait_for_timeout(300)
        self.page.screenshot(path=ARTIFACTS / f"{self.name}-error.png")
        shown = [line for line in self.page.inner_text("body").splitlines() if "Error" in line]
        return "; ".join(dict.fromkeys(shown[:1] + self.errors)) or "no error message"

    def failure_instead_of_button(self, name: str, timeout: float = 45, settle: float = 5) -> str | None:
        """After a thumbnail was opened: OHIF's error, if it fails instead of
        offering the button ``name`` or within ``settle`` seconds after it
        was clicked; ``None`` if nothing failed. The error is the exception
        its error boundary shows, or else the page's errors (console, uncaught)."""
        button = self.page.get_by_role("button", name=name)
        deadline, clicked = time.monotonic() + timeout, False
        while True:
            if why := self.crashed():
                return why
            if self.errors:
                self.page.screenshot(path=ARTIFACTS / f"{self.name}-error.png")
                return "; ".join(dict.fromkeys(self.errors))
            if not clicked and button.count():
                button.click()
                clicked, deadline = True, time.monotonic() + settle
            if time.monotonic() > deadline:
                self.page.screenshot(path=ARTIFACTS / f"{self.name}-no-error.png")
                if clicked:
                    return None
                raise AssertionError(f"OHIF neither failed nor offered {name!r} within {timeout} s")
            time.sleep(0.2)

    def wait_for_button(self, name: str, timeout: float = 45) -> None:
        button = self.page.get_by_role("button", name=name)
        deadline = time.monotonic() + timeout
        while not button.count():
            if why := self.crashed():
                raise AssertionError(f"OHIF {OHIF_VERSION} failed instead of showing {name!r}: {why}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no button {name!r} after {timeout} s; page errors: {self.errors}")
            time.sleep(0.2)
        button.click()

    def geometry(self, sop_instance_uid: str) -> dict:
        """Bring the image ``sop_instance_uid`` into the viewport; return the
        viewport canvas's place on the page and where image coordinates
        (column, row) (0,0), (1,0) and (0,1) land on it (CSS pixels)."""
        geometry = self.page.evaluate(
            """(sop) => {
              const cs = window.cornerstone;
              for (const {viewport: vp} of cs.getEnabledElements()) {
                if (!vp.getImageIds) continue;
                const index = vp.getImageIds().findIndex(id => id.includes(`/instances/${sop}/`));
                if (index < 0) continue;
                if (vp.getCurrentImageIdIndex() !== index) { vp.setImageIdIndex(index); return null; }
                if (vp.getCornerstoneImage && !vp.getCornerstoneImage()) return null;  // still loading
                const id = vp.getCurrentImageId();
                const toCanvas = ([x, y]) => vp.worldToCanvas(cs.utilities.imageToWorldCoords(id, [x, y]));
                const r = vp.canvas.getBoundingClientRect();
                return {rect: [r.x, r.y, r.width, r.height], points: [[0, 0], [1, 0], [0, 1]].map(toCanvas),
                        dpr: window.devicePixelRatio, scale: vp.getCamera().parallelScale};
              }
              return null;
            }""",
            sop_instance_uid,
        )
        return geometry

    def wait_for_geometry(self, sop_instance_uid: str) -> dict:
        geometry = wait_for(lambda: self.geometry(sop_instance_uid), 20, 0.2, f"image {sop_instance_uid} in a viewport")
        assert geometry["scale"] is not None and np.isfinite(geometry["scale"]), (
            f"OHIF cannot place the image (camera scale {geometry['scale']}): invalid geometry in the source?"
        )
        return geometry

    def wait_for_drawn_image(self, sop_instance_uid: str, shape: tuple[int, int], path: Path, timeout: float = 45):
        """A screenshot of the viewport once the image is on screen: more
        than 5 % of the pixels it covers are not black."""
        deadline = time.monotonic() + timeout
        while True:
            geometry = self.wait_for_geometry(sop_instance_uid)
            rgb = self.screenshot(geometry, path)
            _, on_image = footprint(np.zeros(shape, bool), geometry, rgb.shape[:2])
            lit = float((rgb.max(-1) > 16)[on_image].mean()) if on_image.any() else 0.0
            if lit > 0.05:
                return rgb, geometry
            if time.monotonic() > deadline:
                raise AssertionError(f"the image {sop_instance_uid} is not drawn ({lit:.1%} lit); page errors: {self.errors}")
            time.sleep(0.3)

    def wait_for_sr_annotation(self, listed: list[str], sop_instance_uid: str, timeout: float = 45,
                               unprompted: float = SR_UNPROMPTED) -> bool:
        """After an SR's thumbnail was opened: wait until its annotation is
        drawn on ``sop_instance_uid``: the ``listed`` texts and an outline
        (an SVG polyline) in the viewport's SVG layer. Returns whether OHIF
        drew it without being asked to render (within ``unprompted`` s).

        OHIF 3.13.2's SR viewport (OHIFCornerstoneSRMeasurementViewport) sets
        the SR's tracking identifiers in a React effect after the viewport
        element is enabled, and DICOMSRDisplayTool draws only the annotations
        whose identifier is set, but setting them requests no render. When the
        image's first render (and the annotation render that follows it) comes
        first, nothing is drawn until the next render, which any interaction
        (pan, zoom, window) would cause. So after ``unprompted`` seconds this
        asks cornerstone for an annotation render at each poll, the call that
        those interactions make.
        """
        drawn_js = """(texts) => {
          const layers = [...document.querySelectorAll('.svg-layer')];
          const shown = layers.map(l => l.textContent).join('\\n');
          return texts.every(t => shown.includes(t)) && layers.some(l => l.querySelector('polyline'));
        }"""
        render_js = """(sop) => {
          const cs = window.cornerstone;
          const ids = cs.getEnabledElements().map(e => e.viewport)
            .filter(vp => vp.getImageIds && vp.getImageIds().some(id => id.includes(`/instances/${sop}/`)))
            .map(vp => vp.id);
          window.cornerstoneTools.utilities.triggerAnnotationRenderForViewportIds(ids);
        }"""
        start, requested = time.monotonic(), False
        while not self.page.evaluate(drawn_js, listed):
            if why := self.crashed():
                raise AssertionError(f"OHIF {OHIF_VERSION} failed to open the SR: {why}")
            if time.monotonic() > start + timeout:
                self.page.screenshot(path=ARTIFACTS / f"{self.name}.png")
                missing = [text for text in listed if not self.page.get_by_text(text).count()]
                raise AssertionError(f"{missing} not shown (or no outline); page errors: {self.errors}")
            if time.monotonic() > start + unprompted:
                self.page.evaluate(render_js, sop_instance_uid)
                requested = True
            time.sleep(0.2)
        return not requested

    def hide_annotation_labels(self) -> None:
        """Hide the text and the dotted link line cornerstone draws beside
        each annotation in its SVG layer; the annotation's own outline (an
        SVG polyline) stays."""
        self.page.add_style_tag(content=".svg-layer text, .svg-layer line { visibility: hidden !important; }")
        self.page.wait_for_timeout(200)

    def screenshot(self, geometry: dict, path: Path) -> np.ndarray:
        x, y, w, h = geometry["rect"]
        png = self.page.screenshot(clip={"x": x, "y": y, "width": w, "height": h})
        path.write_bytes(png)
        return np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(np.int16)


# --- the pixel check -----------------------------------------------------------------------


def footprint(mask: np.ndarray, geometry: dict, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The mask's screen footprint in a canvas screenshot of ``shape``, and
    the image's: which screen pixels show a mask pixel / any image pixel.

    Each screen pixel's centre goes back through the viewport's own affine
    image-to-canvas map to the image pixel it shows.
    """
    p0, px, py = (np.asarray(p, float) for p in geometry["points"])
    forward = np.column_stack([px - p0, py - p0])  # canvas = p0 + forward @ (column, row)
    dpr = geometry["dpr"]
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w]
    canvas = np.stack([(xs + 0.5) / dpr, (ys + 0.5) / dpr], -1) - p0
    col, row = np.moveaxis(canvas @ np.linalg.inv(forward).T, -1, 0)
    col, row = np.rint(col).astype(int), np.rint(row).astype(int)
    inside = (row >= 0) & (row < mask.shape[0]) & (col >= 0) & (col < mask.shape[1])
    on_mask = np.zeros(shape, bool)
    on_mask[inside] = mask[row[inside], col[inside]]
    return on_mask, inside


def overlay_figures(without: np.ndarray, with_seg: np.ndarray, mask: np.ndarray, geometry: dict) -> dict:
    """How much of the mask's footprint the SEG coloured, and how much of
    what it coloured is on the footprint."""
    on_mask, on_image = footprint(mask, geometry, without.shape[:2])

    def coloured(rgb: np.ndarray) -> np.ndarray:
        return (rgb.max(-1) - rgb.min(-1)) > CHROMA

    # Judged: the image area away from the canvas border, and not where the
    # page is coloured without the SEG (tool icons, the active viewport's frame).
    image_area = ndimage.binary_erosion(on_image, iterations=EDGE)
    without_colour = coloured(without)
    core = ndimage.binary_erosion(on_mask, iterations=EDGE) & image_area
    judged = image_area & ~without_colour
    near = ndimage.binary_dilation(on_mask, iterations=EDGE)
    painted = coloured(with_seg) & judged
    figures = {
        "mask_screen_pixels": int(core.sum()),
        "coloured_without_seg": round(float((without_colour & core).sum() / max(core.sum(), 1)), 4),
        "coverage": round(float((painted & core).sum() / max((core & judged).sum(), 1)), 4),
        "coloured_pixels": int(painted.sum()),
        "precision": round(float((painted & near).sum() / max(painted.sum(), 1)), 4),
    }
    return figures


def seg_overlay_figures(stack: Stack, study: Study, name: str, description: str, series_number: int,
                        source_uid: str, mask: np.ndarray) -> dict:
    """Open the study, screenshot the source image, open the SEG
    ``description``, screenshot again; figures for ``mask`` on ``source_uid``.

    In a study of several series the source's series is first opened in the
    viewport (double-click on its thumbnail), as a radiologist would."""
    viewer = Viewer(stack, study.uid, name)
    try:
        thumb = viewer.thumbnail(description, series_number)
        source_series = {int(ds.SeriesNumber) for ds in study.sources if ds.SOPInstanceUID == source_uid}
        if len({ds.SeriesInstanceUID for ds in study.sources}) > 1:
            [number] = source_series
            viewer.page.locator(f'[data-cy="study-browser-thumbnail"][data-series="{number}"]').first.dblclick()
        without, geometry = viewer.wait_for_drawn_image(source_uid, mask.shape, ARTIFACTS / f"{name}-without-seg.png")
        thumb.dblclick()
        viewer.wait_for_button("Yes")  # "Do you want to open this Segmentation?"
        # The overlay appears over a few frames: judge once the coloured area
        # has stopped changing (or after 15 s), not at the first frame.
        deadline = time.monotonic() + 15
        previous = -1
        while True:
            if why := viewer.crashed():
                raise AssertionError(f"OHIF {OHIF_VERSION} failed to open the SEG: {why}")
            geometry = viewer.wait_for_geometry(source_uid)
            with_seg = viewer.screenshot(geometry, ARTIFACTS / f"{name}-with-seg.png")
            figures = overlay_figures(without, with_seg, mask, geometry)
            painted = figures["coloured_pixels"]
            if (painted and abs(painted - previous) <= 0.01 * painted) or time.monotonic() > deadline:
                break
            previous = painted
            time.sleep(0.3)
        figures["page_errors"] = viewer.errors
        _record(name, figures)
        return figures
    finally:
        viewer.close()


def _record(name: str, figures: dict) -> None:
    path = ARTIFACTS / "figures.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = figures
    path.write_text(json.dumps(data, indent=2))


def most_foreground(seg: pydicom.Dataset) -> tuple[str, np.ndarray]:
    """The source image on which the SEG has the most foreground (all
    segments together), and that mask, decoded with pydicom."""
    masks: dict[str, np.ndarray] = {}
    for source_uid, _, mask in segment_frames(seg):
        masks[source_uid] = masks.get(source_uid, np.zeros_like(mask)) | mask
    assert masks, "the SEG references no source image"
    return max(masks.items(), key=lambda item: int(item[1].sum()))


def _node_seg_figures(stack: Stack, case: Case) -> dict:
    """Figures of the node's own SEG for ``case``, measured once per run."""
    if case.name not in stack.figures:
        study = processed(stack, case)
        seg = study.seg
        sop, mask = most_foreground(seg)
        assert mask.any(), "the node's SEG is empty: nothing to see"
        stack.figures[case.name] = seg_overlay_figures(
            stack, study, case.name, seg.SeriesDescription, int(seg.SeriesNumber), sop, mask
        )
    return stack.figures[case.name]


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", DRAWN, ids=[c.name for c in DRAWN])
def test_seg_drawn_where_the_mask_is(stack, case):
    study = processed(stack, case)
    seg = study.seg
    referenced = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    source = next((ds for ds in study.sources if ds.SeriesInstanceUID == referenced), study.sources[0])
    if "FrameOfReferenceUID" not in seg:
        # A radiograph's SEG: OHIF draws it thanks to the source's own
        # spacing and the pixel grid's identity orientation.
        geometry = grid_geometry(seg)
        assert geometry.spacing is not None and geometry.orientation == (1, 0, 0, 0, 1, 0), geometry
    # OHIF silently draws nothing when these differ from the stored series.
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.get("FrameOfReferenceUID") == source.get("FrameOfReferenceUID")
    figures = _node_seg_figures(stack, case)
    print(f"\n{case.name}: {figures}")
    assert figures["page_errors"] == [], figures
    assert figures["coloured_without_seg"] < 0.01, figures  # the colour comes from the SEG
    assert figures["coverage"] >= MIN_COVERAGE, figures
    assert figures["precision"] >= MIN_PRECISION, figures


@pytest.mark.parametrize("case", LIMITED, ids=[c.name for c in LIMITED])
def test_seg_ohif_cannot_draw_is_the_documented_limitation(stack, case):
    study = processed(stack, case)
    seg, source = study.seg, study.sources[0]
    limitation = case.seg_limitation
    # The node kept out what it could not state truthfully ...
    assert not any(
        keyword in source and all(float(v) > 0 for v in source[keyword].value)
        for keyword in ("PixelSpacing", "ImagerPixelSpacing")
    ), "the source has a valid spacing: this case is not the limitation it claims"
    geometry = grid_geometry(seg)
    assert geometry.spacing is None and geometry.orientation is None, geometry
    # ... and OHIF fails on exactly that, not on something else.
    viewer = Viewer(stack, study.uid, f"{case.name}-seg-limitation")
    try:
        viewer.thumbnail(seg.SeriesDescription, int(seg.SeriesNumber)).dblclick()
        error = viewer.failure_instead_of_button("Yes")
    finally:
        viewer.close()
    print(f"\n{case.name}: OHIF {OHIF_VERSION}: {error}; why: {limitation.why}")
    _record(f"{case.name}-seg-limitation", {"ohif_error": error, "why": limitation.why})
    assert error is not None, f"OHIF {OHIF_VERSION} now opens this SEG: the limitation is gone, draw-test it"
    assert re.search(limitation.ohif_error, error), error


@pytest.mark.parametrize("case", SR_SHOWN, ids=[c.name for c in SR_SHOWN])
def test_sr_measurements_listed_and_outline_drawn(stack, case):
    study = processed(stack, case)
    sr = study.sr
    shows = case.sr_shows(study)
    [source] = [s for s in study.sources if s.SOPInstanceUID == shows.source_uid]
    viewer = Viewer(stack, study.uid, f"{case.name}-sr")
    try:
        shape = (int(source.Rows), int(source.Columns))
        without, _ = viewer.wait_for_drawn_image(shows.source_uid, shape, ARTIFACTS / f"{case.name}-sr-without.png")
        viewer.thumbnail(sr.SeriesDescription, int(sr.SeriesNumber)).dblclick()
        unprompted = viewer.wait_for_sr_annotation(shows.listed, shows.source_uid)
        viewer.page.screenshot(path=ARTIFACTS / f"{case.name}-sr.png")
        viewer.hide_annotation_labels()  # what is left of the SR on the image is its outline
        geometry = viewer.wait_for_geometry(shows.source_uid)
        with_sr = viewer.screenshot(geometry, ARTIFACTS / f"{case.name}-sr-outline.png")
        figures = outline_figures(without, with_sr, shows.region, geometry)
    finally:
        viewer.close()
    figures["listed"] = shows.listed
    figures["drawn_without_render_request"] = unprompted  # recorded, not judged: see wait_for_sr_annotation
    figures["page_errors"] = viewer.errors
    _record(f"{case.name}-sr", figures)
    print(f"\n{case.name} SR: {figures}")
    assert figures["page_errors"] == [], figures
    assert figures["outline_coverage"] >= MIN_OUTLINE_COVERAGE, figures  # the outline is drawn ...
    assert figures["precision"] >= MIN_OUTLINE_PRECISION, figures  # ... there, and nothing else is


@pytest.mark.parametrize("case", SR_LIMITED, ids=[c.name for c in SR_LIMITED])
def test_sr_ohif_cannot_open_is_the_documented_limitation(stack, case):
    """The brain SR holds its five volumes (read back with highdicom), none
    with spatial coordinates, and OHIF 3.13.2 fails to open it exactly as
    :data:`BRAIN_SR` says (the SEG, with the regions, is drawn: see
    ``test_seg_drawn_where_the_mask_is``). If a later OHIF opens it, this
    fails and says the limitation is gone."""
    study = processed(stack, case)
    sr = study.sr
    volumes = {
        group.tracking_identifier: float(m.value)
        for group in [*sr.content.get_volumetric_roi_measurement_groups(), *sr.content.get_image_measurement_groups()]
        for m in group.get_measurements()
        if m.name.meaning == "Volume"
    }
    assert len(volumes) == 5, volumes  # NCR, ED, ET; TC, WT
    assert not sr.content.get_planar_roi_measurement_groups(), "no spatial coordinates in the volumetric report"
    viewer = Viewer(stack, study.uid, f"{case.name}-sr-limitation")
    try:
        viewer.thumbnail(sr.SeriesDescription, int(sr.SeriesNumber)).dblclick()
        deadline = time.monotonic() + 45
        error = viewer.crashed()
        while error is None and not viewer.errors and time.monotonic() < deadline:
            time.sleep(0.5)
            error = viewer.crashed()
        error = error or "; ".join(dict.fromkeys(viewer.errors)) or None
        viewer.page.screenshot(path=ARTIFACTS / f"{case.name}-sr-limitation.png")
    finally:
        viewer.close()
    figures = {"volumes_ml_in_sr": volumes, "ohif_error": error, "why": case.sr_limitation.why}
    _record(f"{case.name}-sr-limitation", figures)
    print(f"\n{case.name} SR in OHIF {OHIF_VERSION}: {figures}")
    assert error is not None, f"OHIF {OHIF_VERSION} now opens this SR: the limitation is gone, test what it lists"
    assert re.search(case.sr_limitation.ohif_error, error), error


def outline_figures(without: np.ndarray, with_sr: np.ndarray, region: np.ndarray, geometry: dict) -> dict:
    """Whether the SR's outline is drawn around ``region``.

    ``region`` is what the outline must surround, on the source's pixel grid:
    the SEG's largest region (decoded from the SEG, not from the SR), or the
    whole image for an empty SEG. Its boundary goes to the screen through the
    viewport's own transform, as the SEG's mask does. OHIF draws the outline as a
    dashed line, so it is judged at points every ``PATH_STEP`` screen pixels
    along its path: drawn where a new coloured pixel (not coloured without
    the SR) is within ``PATH_RADIUS``. Points near the screenshot's border
    (where an outline along the image edge meets the viewport frame) are not
    judged. Precision: the share of new coloured pixels on the image that are
    within ``EDGE`` of the path (``with_sr`` is taken with the annotation's
    labels hidden).
    """
    inside, on_image = footprint(region, geometry, without.shape[:2])
    band = ndimage.binary_dilation(inside, iterations=EDGE) & ~ndimage.binary_erosion(inside, iterations=EDGE)

    def coloured(rgb: np.ndarray) -> np.ndarray:
        return (rgb.max(-1) - rgb.min(-1)) > CHROMA

    # On the image only (the outline's coordinates are within it); the SR
    # viewport's badge beside the image is not the annotation.
    new = coloured(with_sr) & ~coloured(without) & ndimage.binary_dilation(on_image, iterations=EDGE)
    h, w = new.shape
    path = max(measure.find_contours(np.pad(inside, 1).astype(float), 0.5), key=len) - 1
    samples = np.rint(path[::PATH_STEP]).astype(int)
    margin = EDGE + PATH_RADIUS
    judged = samples[
        (samples[:, 0] >= margin) & (samples[:, 0] < h - margin) & (samples[:, 1] >= margin) & (samples[:, 1] < w - margin)
    ]
    assert len(judged) > 20, f"only {len(judged)} points of the outline's path are on the screen away from its border"
    distance = ndimage.distance_transform_edt(~new)
    drawn = distance[judged[:, 0], judged[:, 1]] <= PATH_RADIUS
    return {
        "path_points_judged": int(len(judged)),
        "outline_coverage": round(float(drawn.mean()), 4),
        "coloured_pixels": int(new.sum()),
        "precision": round(float((new & band).sum() / max(new.sum(), 1)), 4),
    }


def _variant(seg_bytes: bytes, description: str, series_number: int, *, pixels: np.ndarray | None = None,
             orientation: list[float] | None = None) -> bytes:
    """A copy of the node's SEG as a series of its own, with other pixels
    (one frame) or another Plane Orientation."""
    ds = pydicom.dcmread(BytesIO(seg_bytes))
    if pixels is not None:
        assert int(ds.NumberOfFrames) == 1
        ds.PixelData = pydicom.pixels.pack_bits(pixels.astype(np.uint8))
    if orientation is not None:
        ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient = orientation
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _orientation_from_patient_orientation(row: str, column: str) -> list[float]:
    """Image Orientation (Patient) that Patient Orientation codes would give
    (PS3.3 C.7.6.1.1.1: L/R, P/A, H/F along the patient's x, y, z; LPS)."""
    axes = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "H": (0, 0, 1), "F": (0, 0, -1)}
    return [float(v) for v in (*axes[row], *axes[column])]


def _wrong_placements(mask: np.ndarray) -> dict[str, np.ndarray]:
    """The mask flipped up-down, left-right and (if square) transposed."""
    wrong = {"flipped-rows": mask[::-1], "flipped-columns": mask[:, ::-1]}
    if mask.shape[0] == mask.shape[1]:
        wrong["transposed"] = mask.T
    return wrong


def test_pixel_check_tells_right_from_wrong(stack):
    """The overlay check on the node's SEG and on copies placed wrongly: the
    wrong one that overlaps the mask least must land (almost) off it. And a
    copy whose Plane Orientation is derived from Patient Orientation
    (RG1_UNCR's L\\F) instead of the pixel grid's identity is refused by
    OHIF: the reason the node does not derive it."""
    if not DRAWN:
        pytest.skip("no case whose SEG OHIF draws")
    case = DRAWN[0]
    study = processed(stack, case)
    sop, mask = most_foreground(study.seg)
    name, wrong = min(_wrong_placements(mask).items(), key=lambda item: int((item[1] & mask).sum()))
    overlap = float((wrong & mask).sum() / mask.sum())
    # A wrong placement that maps the mask mostly onto itself proves nothing.
    assert overlap < 0.5, f"this mask is too symmetric for a placement control ({name}: {overlap:.0%})"
    right = _node_seg_figures(stack, case)
    description = f"control-{name} {case.name}"
    stack.pacs.store(_variant(study.seg_bytes, description, 9901, pixels=wrong))
    misplaced = seg_overlay_figures(stack, study, f"control-{name}", description, 9901, sop, mask)

    coronal = _orientation_from_patient_orientation("L", "F")
    description = f"control-patient-orientation {case.name}"
    stack.pacs.store(_variant(study.seg_bytes, description, 9902, orientation=coronal))
    viewer = Viewer(stack, study.uid, "control-patient-orientation")
    try:
        viewer.thumbnail(description, 9902).dblclick()
        refused = viewer.failure_instead_of_button("Yes")
    finally:
        viewer.close()
    results = {"node": right, f"control-{name}": misplaced, "wrong_overlap_with_mask": round(overlap, 4),
               "control-patient-orientation": {"orientation": coronal, "ohif_error": refused}}
    _record("controls", results)
    print(f"\ncontrols: {results}")
    assert right["coverage"] >= MIN_COVERAGE and right["precision"] >= MIN_PRECISION, right
    assert misplaced["coloured_pixels"] > 0.5 * right["coloured_pixels"], "the misplaced SEG must be drawn too"
    assert misplaced["coverage"] <= overlap + 0.1 and misplaced["precision"] <= overlap + 0.1, misplaced
    assert refused is not None and "orthogonal to the acquisition plane" in refused, refused
