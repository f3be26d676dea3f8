"""The dashboard in a real (headless) browser, on a real node at work.

``ainode serve`` runs as its own process with the pneumonia and brain
tumour routes and a real Orthanc as its destination (as in
tests/test_end_to_end.py); dcmtk's storescu sends a chest radiograph
(pydicom-data RG1_UNCR) and the four-sequence brain phantom
(tests/brain_phantom.py). Playwright drives Debian's Chromium (as
tests/test_ohif.py does) through the login form, then:

- both studies appear and reach ``done``; their findings are what the SRs
  that Orthanc received say (pneumonia probability and Present/Absent; ET,
  TC, WT in ml), and their previews load (``naturalWidth`` > 0) and hold
  the SEG's colours over the grey source;
- the session cookie is HttpOnly and SameSite=Strict; a form POST without
  the session's CSRF token, or from another Origin, is refused;
- re-send on a delivery records a second attempt, shown on the page.

Screenshots at 1366x768 go to ``test-artifacts/dashboard/``.
"""

from __future__ import annotations

import re
import secrets
import shutil
import sqlite3
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.brain_phantom import make_phantom
from tests.peers import REPO, NodeProcess, free_port, node_sections, storescu, write_node_toml
from tests.test_end_to_end import BRAIN_ROUTE, CXR_ROUTE, derived_in_orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
VIEWPORT = {"width": 1366, "height": 768}
OHIF = "http://ohif.example:3000"
TOKEN_ENV = "AINODE_TEST_DASHBOARD_TOKEN"


@pytest.fixture
def node(tmp_path, orthanc):
    token = secrets.token_urlsafe(32)
    ports = {"node": free_port(), "api": free_port()}
    sections = node_sections(
        tmp_path,
        node={"ae_title": "AINODE", "bind_address": "127.0.0.1", "port": ports["node"]},
        completion={"sweep_interval_seconds": 0.5, "series_idle_seconds": 10, "study_idle_seconds": 2,
                    "complete_on_release": True},
        destinations={"pacs": {"kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1",
                               "port": orthanc.dicom_port}},
        retry={"max_attempts": 5, "initial_delay_seconds": 0.5, "multiplier": 1.5, "max_delay_seconds": 2},
        worker={"torch_threads": 2},
        api={"bind_address": "127.0.0.1", "port": ports["api"], "ohif_url": OHIF,
             "tokens": [{"name": "night-operator", "scopes": ["read", "operator"], "env": TOKEN_ENV}]},
    )
    config = write_node_toml(tmp_path / "node.toml", sections, CXR_ROUTE + BRAIN_ROUTE)
    proc = NodeProcess(config, tmp_path, env={TOKEN_ENV: token}).start(ports["api"], timeout=120)
    yield proc, ports, token, tmp_path / "index.db"
    proc.stop()


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is required: apt-get install chromium (make browser-deps)")
    from playwright.sync_api import sync_playwright

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _sr_in_orthanc(orthanc, study_uid: str) -> hd.sr.Comprehensive3DSR:
    [sr_id] = derived_in_orthanc(orthanc, study_uid)["SR"]
    return hd.sr.srread(BytesIO(orthanc.file(sr_id)))


def _expected_cxr(sr) -> re.Pattern:
    [roi] = sr.content.get_planar_roi_measurement_groups()
    p = next(m.value for m in roi.get_measurements() if m.name.meaning == "Probability")
    [evaluation] = [q for q in roi.get_qualitative_evaluations() if q.name.meaning == "Pneumonia"]
    return re.compile(rf"Pneumonia {evaluation.value.meaning.lower()}, p = {float(p):.2f}")


def _expected_brain(sr) -> str:
    groups = [*sr.content.get_volumetric_roi_measurement_groups(), *sr.content.get_image_measurement_groups()]
    ml = {re.search(r"\((\w+)", str(g.tracking_identifier)).group(1): float(g.get_measurements()[0].value)
          for g in groups}
    return ", ".join(f"{k} {ml[k]:.2f} ml" for k in ("ET", "TC", "WT"))


def _coloured_fraction(png: bytes) -> float:
    rgb = np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(int)
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())


def test_dashboard_shows_both_studies_and_resends(node, browser, orthanc, rg1_uncr, dcmtk, tmp_path):
    proc, ports, token, db = node
    base = f"http://127.0.0.1:{ports['api']}"
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()

    page.goto(base + "/")
    assert page.url == base + "/login"  # tokens are configured: no open read
    page.fill("input[name=token]", "not-a-token-of-this-node")
    page.click("button[type=submit]")
    assert "unknown token" in page.inner_text("[role=alert]")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    [cookie] = context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["secure"]) == (
        "ainode_session", True, "Strict", False)  # Secure only over HTTPS

    phantom = make_phantom(out_dir=tmp_path / "phantom")
    assert storescu([rg1_uncr], ports["node"], "AINODE").returncode == 0
    for paths in phantom.paths.values():
        assert storescu(list(paths), ports["node"], "AINODE", calling_aet="MRSCANNER").returncode == 0
    cxr_uid = pydicom.dcmread(rg1_uncr, stop_before_pixels=True).StudyInstanceUID
    brain_uid = phantom.datasets["T1c"][0].StudyInstanceUID

    # The page refreshes itself every 5 s: no reload, as an operator watches it.
    page.wait_for_selector(f'tr.study[data-study-uid="{cxr_uid}"]', timeout=30_000)
    page.screenshot(path=ARTIFACTS / "dashboard-in-progress.png")
    row = {uid: f'tr.study[data-study-uid="{uid}"]' for uid in (cxr_uid, brain_uid)}
    page.wait_for_function(
        """rows => rows.every(sel => {
             const r = document.querySelector(sel);
             return r && r.dataset.state === "done" && r.querySelectorAll("tr.delivery").length === 2
               && Array.from(r.querySelectorAll("tr.delivery")).every(d => d.textContent.includes("delivered"))
               && r.querySelector("img.preview") && r.querySelector("img.preview").complete
               && r.querySelector("img.preview").naturalWidth > 0; })""",
        arg=list(row.values()), timeout=150_000, polling=500,
    )
    assert _expected_cxr(_sr_in_orthanc(orthanc, cxr_uid)).search(page.inner_text(row[cxr_uid] + " .finding"))
    assert page.inner_text(row[brain_uid] + " .finding") == _expected_brain(_sr_in_orthanc(orthanc, brain_uid))
    for uid in (cxr_uid, brain_uid):
        link = page.get_attribute(row[uid] + " a[href^='http://ohif']", "href")
        assert link == f"{OHIF}/viewer?StudyInstanceUIDs={uid}"
        src = page.get_attribute(row[uid] + " img.preview", "src")
        png = page.request.get(base + src)
        assert png.ok and png.headers["content-type"] == "image/png"
        assert 0.0005 < _coloured_fraction(png.body()) < 0.5, "the SEG is drawn in colour over the grey source"
        assert page.locator(row[uid] + " svg.timeline line").count() == 6  # every moment up to delivered
    assert re.search(r"median \d+\.\d s · p95 \d+\.\d s · 2 jobs", page.inner_text("#latency-figures"))
    page.screenshot(path=ARTIFACTS / "dashboard.png")
    page.screenshot(path=ARTIFACTS / "dashboard-full.png", full_page=True)

    # A form without the session's CSRF token, or from another site, is refused.
    first = page.locator(row[cxr_uid] + " tr.delivery").first
    delivery_id = int(first.get_attribute("data-delivery-id"))
    url = f"{base}/dashboard/deliveries/{delivery_id}/resend"
    forged = page.request.post(url, form={"csrf": "guess", "reason": "x"}, headers={"Origin": base})
    assert forged.status == 403 and "CSRF" in forged.text()
    csrf = page.get_attribute("input[name=csrf]", "value")
    cross = page.request.post(url, form={"csrf": csrf, "reason": "x"}, headers={"Origin": "http://evil.example"})
    assert cross.status == 403 and "Origin" in cross.text()

    page.click(row[cxr_uid] + " details summary")
    first.locator("input[name=reason]").fill("PACS lost the object")
    first.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(r"/\?msg="))
    assert f"delivery {delivery_id} queued to be sent again" in page.inner_text("[role=status]")
    again = f'tr.delivery[data-delivery-id="{delivery_id}"]'
    page.wait_for_function(
        """sel => { const d = document.querySelector(sel);
                    return d && d.dataset.attemptsTotal === "2" && d.textContent.includes("delivered"); }""",
        arg=again, timeout=30_000, polling=500,
    )
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
        attempts = c.execute("SELECT ok FROM delivery_attempts WHERE delivery_id = ?", (delivery_id,)).fetchall()
        audit = c.execute("SELECT actor, details FROM audit_events WHERE event = 'operator_action'").fetchall()
    assert attempts == [(1,), (1,)]
    assert len(audit) == 1 and audit[0][0] == "night-operator" and "PACS lost the object" in audit[0][1]
    page.locator(row[cxr_uid] + " details summary").click()
    page.screenshot(path=ARTIFACTS / "dashboard-resent.png")
    context.close()


def test_open_read_on_loopback_without_tokens_but_no_actions(node_config):
    """Loopback, no [[api.tokens]]: the page and its live part are open to
    read; every action is refused (nobody can hold the operator scope)."""
    from fastapi.testclient import TestClient

    from node.api import create_app
    from node.service import Node

    node = Node(node_config(node={"bind_address": "127.0.0.1", "port": free_port()},
                            destinations={"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                                   "port": free_port()}},
                            api={"bind_address": "127.0.0.1", "port": 0}))
    try:
        client = TestClient(create_app(node), base_url="http://127.0.0.1")
        page = client.get("/")
        assert page.status_code == 200 and "open read (loopback, no tokens)" in page.text
        assert "No study received yet." in client.get("/dashboard/live").text
        assert 'disabled title="needs a login with the operator scope"' in page.text
        refused = client.post("/dashboard/destinations/pacs/pause", data={"csrf": "", "reason": "test"},
                              headers={"Origin": "http://127.0.0.1"})
        assert refused.status_code == 401
        assert client.post("/login", data={"token": "x" * 32}, headers={"Origin": "http://127.0.0.1"}).status_code == 403
        assert client.get("/previews/1.png").status_code == 404
    finally:
        node.index.close()
        if node.api is not None:
            node.api.stop()
