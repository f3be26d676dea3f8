"""The ``ainode`` command line, against real in-process peers."""

from __future__ import annotations

import json

import pydicom
import pytest
from typer.testing import CliRunner

from node.cli import app, parse_peer
from tests.peers import REPO, free_port
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

    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\nindex_url = "sqlite:///{tmp_path / "index.db"}"\n')
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
