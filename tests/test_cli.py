"""The ``ainode`` command line, against real in-process peers."""

from __future__ import annotations

import json

import pydicom
import pytest
from typer.testing import CliRunner

from node.cli import app, parse_peer
from tests.peers import REPO, free_port, node_sections, write_node_toml
from tests.test_receive import make_receiver

runner = CliRunner()


def test_config_check_prints_the_effective_configuration(monkeypatch):
    monkeypatch.setenv("AINODE_NODE__PORT", "11999")
    result = runner.invoke(app, ["config", "check", str(REPO / "config" / "node.toml")])
    assert result.exit_code == 0, result.output
    effective = json.loads(result.stdout)
    assert effective["node"]["port"] == 11999  # the environment wins over the file
    assert effective["routes"][0]["pipeline"] == "pneumonia"


def test_config_check_names_the_wrong_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nport = "eleven"\n[retry]\nmax_attempts = 0\n')
    result = runner.invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == 2
    assert "node.port" in result.output and "retry.max_attempts" in result.output
    missing = runner.invoke(app, ["config", "check", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "not found" in missing.output


@pytest.mark.parametrize("bad", ["AINODE", "AINODE@host", "AINODE@host:99999", "TOO_LONG_AE_TITLE_X@h:104"])
def test_peer_syntax_is_checked(bad):
    import typer

    with pytest.raises(typer.BadParameter):
        parse_peer(bad)


def test_echo_send_status_and_offline_run(tmp_path, rg1_uncr, monkeypatch):
    receiver, index, spool = make_receiver(tmp_path)
    port = receiver.address[1]
    try:
        assert runner.invoke(app, ["echo", "--to", f"AINODE@127.0.0.1:{port}"]).exit_code == 0
        assert runner.invoke(app, ["echo", "--to", f"AINODE@127.0.0.1:{free_port()}"]).exit_code == 1

        sent = runner.invoke(app, ["send", str(rg1_uncr), "--to", f"AINODE@127.0.0.1:{port}"])
        assert sent.exit_code == 0, sent.output
        assert "0x0000" in sent.output
        assert index.counts()["instances"]["total"] == 1
    finally:
        receiver.stop()
        index.close()

    config = write_node_toml(tmp_path / "node.toml", node_sections(tmp_path))  # the receiver's
    status = runner.invoke(app, ["status", "--json", "--config", str(config)])
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["counts"]["series"] == {"receiving": 1}

    out = tmp_path / "out"
    run = runner.invoke(app, ["run", "pneumonia", str(rg1_uncr), "--out", str(out), "--config", str(config)])
    assert run.exit_code == 0, run.output
    written = sorted(p.name.split("_")[0] for p in out.glob("*.dcm"))
    assert written == ["SEG", "SR"]
    for path in out.glob("*.dcm"):
        assert "NOT FOR DIAGNOSTIC USE" in pydicom.dcmread(path).SeriesDescription


def test_models_list_shows_the_demo_card():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    assert "pneumonia-densenet121-demo" in result.output and "demonstration only" in result.output


def _testdata(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data holds {name}"
    return path


def test_send_reports_unsendable_files_and_goes_on(tmp_path):
    receiver, index, _ = make_receiver(tmp_path)
    files = [
        _testdata("CT_small.dcm"),
        _testdata("emri_small_jpeg_2k_lossless_too_short.dcm"),  # truncated: pydicom reads an empty data set
        _testdata("SC_rgb_jpeg.dcm"),  # implicit VR under an explicit VR transfer syntax: cannot be encoded
        _testdata("MR_small.dcm"),
    ]
    try:
        sent = runner.invoke(app, ["send", *files, "--to", f"AINODE@127.0.0.1:{receiver.address[1]}"])
        stored = index.counts()["instances"]["total"]
    finally:
        receiver.stop()
        index.close()
    assert sent.exit_code == 1, sent.output
    lines = {line.split(": ", 1)[0]: line for line in sent.output.splitlines() if ".dcm: " in line}
    assert "C-STORE status 0x0000 (Success)" in lines[files[0]] and "0x0000" in lines[files[3]]
    assert "failed: no SOP Class UID or SOP Instance UID in the data set" in lines[files[1]]
    assert "failed: not sent: Failed to encode the supplied dataset" in lines[files[2]]
    assert "found implicit VR" in lines[files[2]]  # pydicom's warning names the cause
    assert "2 of 4 files not stored" in sent.output
    assert stored == 2


def test_send_and_echo_say_why_there_is_no_association():
    port = free_port()
    sent = runner.invoke(app, ["send", _testdata("CT_small.dcm"), "--to", f"PACS@127.0.0.1:{port}"])
    assert sent.exit_code == 1
    assert f"association to PACS@127.0.0.1:{port} failed: connection refused (transient)" in sent.output
    echo = runner.invoke(app, ["echo", "--to", f"PACS@127.0.0.1:{port}"])
    assert echo.exit_code == 1 and "association failed: connection refused" in echo.output


def _dispatch_setup(tmp_path, port: int, aet: str = "PACS"):
    """The node's config in-process and the same as a TOML file for the CLI."""
    from tests.test_dispatch import _config, _dest

    cfg = _config(tmp_path, {"pacs": _dest(port, aet)})
    toml = write_node_toml(tmp_path / "node.toml", node_sections(tmp_path, destinations={"pacs": _dest(port, aet)}))
    return cfg, toml


def test_deliveries_resend_is_picked_up_by_the_running_dispatcher(tmp_path, rg1_uncr):
    from node.dispatch import Dispatcher
    from node.index import Index
    from node.spool import Spool
    from tests.peers import wait_for
    from tests.test_dispatch import StoreSCP, _queue_result

    pacs = StoreSCP(free_port(), status=0x0122).start()  # SOP class not supported: permanent
    cfg, toml = _dispatch_setup(tmp_path, pacs.port)
    index = Index(cfg.storage.index_url)
    spool = Spool(cfg.storage.spool_dir, cfg.storage.quarantine_dir, cfg.storage.outbox_dir)
    uid = _queue_result(cfg, index, spool, rg1_uncr, ["pacs"])
    dispatcher = Dispatcher(cfg, index)
    dispatcher.start()
    try:
        wait_for(lambda: index.deliveries()[0].state == "failed", 20, what="permanent failure")
        (d,) = index.deliveries()
        pacs.status = 0x0000  # the PACS is fixed
        assert runner.invoke(app, ["deliveries", "resend", "--config", str(toml)]).exit_code == 2
        assert runner.invoke(app, ["deliveries", "resend", str(d.id), "--failed", "--config", str(toml)]).exit_code == 2
        again = runner.invoke(
            app, ["deliveries", "resend", "--failed", "--by", "tester", "--reason", "PACS fixed", "--config", str(toml)]
        )
        assert again.exit_code == 0, again.output
        assert f"queued again: #{d.id}" in again.output
        # Same dispatcher, not restarted: it polls due deliveries every second.
        wait_for(lambda: index.deliveries()[0].state == "delivered", 5, what="re-sent delivery")
        # A delivered result, re-sent by id: the same file, the same SOP Instance UID.
        by_id = runner.invoke(app, ["deliveries", "resend", str(d.id), "999", "--config", str(toml)])
        assert by_id.exit_code == 1 and "#999: no such delivery" in by_id.output
        wait_for(lambda: len(index.attempts(d.id)) == 3 and index.deliveries()[0].state == "delivered", 5, what="second re-send")
    finally:
        dispatcher.stop()
        pacs.stop()
    assert pacs.received == [uid, uid, uid]
    assert [(a.ok, a.status) for a in index.attempts(d.id)] == [(False, "0x0122"), (True, "0x0000"), (True, "0x0000")]
    history = [(t.from_state, t.to_state) for t in index.transitions("delivery", d.id)]
    assert history == [
        ("pending", "failed"), ("failed", "pending"), ("pending", "delivered"), ("delivered", "pending"), ("pending", "delivered")
    ]
    reasons = [t.reason for t in index.transitions("delivery", d.id) if t.to_state == "pending"]
    assert reasons[0] == "resend by tester: PACS fixed"
    assert reasons[1].startswith("resend by ") and reasons[1].endswith(": manual re-send")
    index.close()


def test_resent_result_is_stored_once_by_orthanc(tmp_path, rg1_uncr, orthanc):
    from node.dispatch import Dispatcher
    from node.index import Index
    from node.spool import Spool
    from tests.peers import wait_for
    from tests.test_dispatch import _queue_result

    cfg, toml = _dispatch_setup(tmp_path, orthanc.dicom_port, orthanc.aet)
    index = Index(cfg.storage.index_url)
    spool = Spool(cfg.storage.spool_dir, cfg.storage.quarantine_dir, cfg.storage.outbox_dir)
    uid = _queue_result(cfg, index, spool, rg1_uncr, ["pacs"])
    study_uid = pydicom.dcmread(rg1_uncr, stop_before_pixels=True).StudyInstanceUID
    dispatcher = Dispatcher(cfg, index)
    dispatcher.start()
    try:
        wait_for(lambda: index.deliveries()[0].state == "delivered", 20, what="delivery to Orthanc")
        (d,) = index.deliveries()
        assert runner.invoke(app, ["deliveries", "resend", str(d.id), "--config", str(toml)]).exit_code == 0
        wait_for(lambda: len(index.attempts(d.id)) == 2 and index.deliveries()[0].state == "delivered", 10, what="re-send")
    finally:
        dispatcher.stop()
    assert [a.ok for a in index.attempts(d.id)] == [True, True]
    instances = orthanc.study_instances(study_uid)
    assert [i["MainDicomTags"]["SOPInstanceUID"] for i in instances] == [uid]
    index.close()
