"""DICOM TLS (PS3.15 Annex B.9): the node's TLS port and its TLS destinations.

Certificates are made here (tests/certs.py). The SCP runs in-process, so
its log lines are captured with structlog; the peers are real: dcmtk's
storescu and storescp with ``+tls``, Orthanc 1.10 with DICOM TLS, and
deploy/orthanc/ as shipped with its node entry switched to TLS.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
import structlog
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from node.config import ConfigError, load_config
from node.destinations import DestinationContext
from node.destinations.dicom import DestinationTls, DicomDestination, DicomSender
from node.tls import client_context, peer_tls_info
from tests.certs import Pki, make_pki, write_encrypted_key
from tests.peers import DeployedOrthanc, Orthanc, free_port, require_orthanc, wait_for
from tests.test_receive import make_receiver


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def node_tls(pki: Pki, **kw) -> dict:
    return {"port": free_port(), "certificate": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca), **kw}


@pytest.fixture
def tls_scp(tmp_path, pki):
    receiver, index, spool = make_receiver(tmp_path, tls=node_tls(pki))
    yield receiver, index, spool
    receiver.stop()
    index.close()


def client_tls(pki: Pki, *, cert: str | None = "ours", ca: Path | None = None) -> DestinationTls:
    files = {
        "ours": {"certificate": pki.client_cert, "key": pki.client_key},
        "other": {"certificate": pki.other_client_cert, "key": pki.other_client_key},
        None: {},
    }[cert]
    return DestinationTls(ca=ca or pki.ca, **files)


def tls_associate(address, tls: DestinationTls | None, contexts=(Verification,), calling_ae="MODALITY"):
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.network_timeout = 5
    for ctx in contexts:
        ae.add_requested_context(*ctx) if isinstance(ctx, tuple) else ae.add_requested_context(ctx)
    args = (client_context(tls), address[0]) if tls is not None else None
    return ae.associate(*address, ae_title="AINODE", tls_args=args)


def tls_echo_ok(address, pki) -> bool:
    assoc = tls_associate(address, client_tls(pki))
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()


# --- configuration --------------------------------------------------------------------------


def test_default_is_plain_only():
    cfg = load_config(None).node
    assert (cfg.plain, cfg.port, cfg.tls, cfg.listen_backlog) == (True, 11112, None, 64)


def test_tls_configuration_is_checked(pki, tmp_path):
    tls = load_config(None, node={"tls": node_tls(pki)}).node.tls
    assert (tls.require_client_certificate, str(tls.minimum_version)) == (True, "1.2")
    cases = [
        ({"plain": False}, "plain: false needs [node.tls]"),
        ({"tls": node_tls(pki, ca=None)}, "ca: needed to verify client certificates"),
        ({"port": 4000, "tls": node_tls(pki, port=4000)}, "tls.port: 4000 is also the plain DICOM port"),
        ({"tls": node_tls(pki, key=str(pki.client_key))}, "certificate, key: cannot load"),
        ({"tls": node_tls(pki, certificate=str(tmp_path / "none.crt"))}, "node.tls.certificate"),
    ]
    for node, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, node=node)
    with pytest.raises(ValueError, match="certificate, key: give both or neither"):
        DestinationTls(ca=pki.ca, certificate=pki.client_cert)


def test_encrypted_key_with_password_or_password_file(pki, tmp_path):
    key = write_encrypted_key(pki.server_key, tmp_path / "server-enc.key", "s3cret phrase")
    (tmp_path / "pass").write_text("s3cret phrase\n")
    ok = load_config(None, node={"tls": node_tls(pki, key=str(key), key_password_file=str(tmp_path / "pass"))})
    assert ok.node.tls.key_password.get_secret_value() == "s3cret phrase"
    assert "s3cret" not in repr(ok.node.tls)
    with pytest.raises(ConfigError, match="cannot load") as err:
        load_config(None, node={"tls": node_tls(pki, key=str(key), key_password="wrong")})
    assert "wrong" not in str(err.value)


# --- the SCP, in-process, with pynetdicom as the client ---------------------------------------


def test_tls_and_plain_side_by_side(tls_scp, pki, rg1_uncr):
    receiver, index, spool = tls_scp
    src = pydicom.dcmread(rg1_uncr)
    assoc = tls_associate(receiver.tls_address, client_tls(pki), [(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)])
    assert assoc.is_established
    [acceptor] = [a for a in receiver.ae.active_associations]
    assert peer_tls_info(acceptor) == (True, pki.client_subject)
    assert assoc.send_c_store(src).Status == 0x0000
    assoc.release()
    assert spool.instance_path(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID).is_file()
    assert index.counts()["instances"]["total"] == 1

    plain = tls_associate(receiver.address, None)
    assert plain.is_established and plain.send_c_echo().Status == 0x0000
    assert peer_tls_info(receiver.ae.active_associations[0]) == (False, None)
    plain.release()


def _listen_backlog(port: int) -> int:
    """Send-Q of a listening socket in ``ss -ltn``: its backlog (Linux)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


def test_listen_backlog_applies_to_both_ports(tmp_path, pki):
    receiver, index, _ = make_receiver(tmp_path, listen_backlog=37, tls=node_tls(pki))
    try:
        assert _listen_backlog(receiver.address[1]) == 37
        assert _listen_backlog(receiver.tls_address[1]) == 37
    finally:
        receiver.stop()
        index.close()


def test_optional_client_certificate(tmp_path, pki):
    receiver, index, _ = make_receiver(tmp_path, plain=False, tls=node_tls(pki, ca=None, require_client_certificate=False))
    try:
        with pytest.raises(RuntimeError, match="plain DICOM is off"):
            _ = receiver.address
        assoc = tls_associate(receiver.tls_address, client_tls(pki, cert=None))
        assert assoc.is_established
        assert peer_tls_info(receiver.ae.active_associations[0]) == (True, None)
        assoc.release()
    finally:
        receiver.stop()
        index.close()


@pytest.mark.parametrize(
    ("cert", "reason"),
    [(None, "PEER_DID_NOT_RETURN_A_CERTIFICATE"), ("other", "CERTIFICATE_VERIFY_FAILED")],
    ids=["no-certificate", "other-ca"],
)
def test_client_without_a_trusted_certificate_is_refused_and_logged(tls_scp, pki, cert, reason):
    receiver, index, _ = tls_scp
    with structlog.testing.capture_logs() as logs:
        assoc = tls_associate(receiver.tls_address, client_tls(pki, cert=cert))
        assert not assoc.is_established
        failed = wait_for(lambda: [e for e in logs if e["event"] == "tls_handshake_failed"], 5, what="log line")
    assert failed[0]["peer_address"] == "127.0.0.1" and failed[0]["port"] == receiver.tls_address[1]
    assert reason in failed[0]["reason"], failed
    assert failed[0]["log_level"] == "warning"
    assert tls_echo_ok(receiver.tls_address, pki)  # still serving


def test_silent_connection_does_not_hold_other_senders(tmp_path, pki):
    receiver, index, _ = make_receiver(tmp_path, tls=node_tls(pki, handshake_timeout_seconds=1.5))
    try:
        with structlog.testing.capture_logs() as logs:
            silent = [socket.create_connection(receiver.tls_address) for _ in range(3)]
            time.sleep(0.2)  # accepted, waiting in their handshake
            t = time.perf_counter()
            assert tls_echo_ok(receiver.tls_address, pki)
            delay = time.perf_counter() - t
            assert delay < 1.0, f"TLS C-ECHO took {delay:.2f} s behind silent connections"
            timed_out = wait_for(
                lambda: [e for e in logs if e["event"] == "tls_handshake_failed"] if len(logs) >= 3 else None,
                5,
                what="the silent connections' handshake timeouts",
            )
        assert all("no handshake within 1.5 s" in e["reason"] for e in timed_out), timed_out
        for s in silent:
            assert s.recv(1) == b""  # closed by the node
            s.close()
    finally:
        receiver.stop()
        index.close()


def test_plain_dicom_to_the_tls_port_fails_cleanly(tls_scp, pki):
    receiver, *_ = tls_scp
    with structlog.testing.capture_logs() as logs:
        t = time.perf_counter()
        assoc = tls_associate(receiver.tls_address, None)
        assert not assoc.is_established
        assert time.perf_counter() - t < 3
        failed = wait_for(lambda: [e for e in logs if e["event"] == "tls_handshake_failed"], 5, what="log line")
    assert "WRONG_VERSION_NUMBER" in failed[0]["reason"] or "wrong version" in failed[0]["reason"].lower(), failed
    assert tls_echo_ok(receiver.tls_address, pki)


def test_sender_refuses_a_server_it_does_not_trust(tls_scp, pki, rg1_uncr, tmp_path):
    receiver, index, _ = tls_scp
    host, port = receiver.tls_address
    dest = DicomDestination(kind="dicom", ae_title="AINODE", host=host, port=port, timeout_seconds=5,
                            tls={"ca": str(pki.other_ca), "certificate": str(pki.client_cert), "key": str(pki.client_key)})
    [outcome] = DicomSender(dest, DestinationContext(calling_ae="RESULTS")).send([rg1_uncr])
    assert not outcome.ok and "TLS" in outcome.error
    # The name checked is the host's: "localhost" is in the server's SAN, "127.0.0.2" is not.
    good = DicomDestination(kind="dicom", ae_title="AINODE", host=host, port=port, timeout_seconds=5,
                            tls={"ca": str(pki.ca), "certificate": str(pki.client_cert), "key": str(pki.client_key)})
    assert DicomSender(good, DestinationContext(calling_ae="RESULTS")).send([rg1_uncr])[0].ok
    wrong_name = good.model_copy(update={"tls": good.tls.model_copy(update={"server_hostname": "pacs.example.org"})})
    assert not DicomSender(wrong_name, DestinationContext(calling_ae="RESULTS")).send([rg1_uncr])[0].ok


# --- real peers: dcmtk and Orthanc -------------------------------------------------------------


def _tls_flags(key: Path, cert: Path, ca: Path) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


@pytest.mark.integration
def test_storescu_over_tls_is_stored(tls_scp, pki, rg1_uncr, dcmtk):
    receiver, index, _ = tls_scp
    host, port = receiver.tls_address
    env = {**os.environ, "TCP_NODELAY": "1"}
    cmd = ["storescu", *_tls_flags(pki.client_key, pki.client_cert, pki.ca), "-aet", "MODALITY", "-aec", "AINODE"]
    cmd += [host, str(port), str(rg1_uncr)]
    sent = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert index.counts()["instances"]["total"] == 1

    # Plain C-STORE to the TLS port: refused at once; the node keeps serving.
    plain = subprocess.run(["storescu", "-aec", "AINODE", host, str(port), str(rg1_uncr)], env=env,
                           capture_output=True, text=True, timeout=30)
    assert plain.returncode != 0
    assert tls_echo_ok(receiver.tls_address, pki)


@pytest.mark.integration
def test_sender_delivers_to_storescp_over_tls(tmp_path, pki, rg1_uncr, dcmtk):
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", *_tls_flags(pki.server_key, pki.server_cert, pki.ca), "-aet", "PACS", "-od", str(out), str(port)],
        stdout=open(tmp_path / "storescp.log", "ab"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 10, what="storescp")
        dest = DicomDestination(kind="dicom", ae_title="PACS", host="127.0.0.1", port=port, timeout_seconds=10,
                                tls={"ca": str(pki.ca), "certificate": str(pki.client_cert), "key": str(pki.client_key)})
        [outcome] = DicomSender(dest, DestinationContext(calling_ae="AINODE")).send([rg1_uncr])
        assert outcome.ok and outcome.status == "0x0000", outcome
        [stored] = wait_for(lambda: list(out.iterdir()), 5, what="file from storescp")
        assert pydicom.dcmread(stored).SOPInstanceUID == pydicom.dcmread(rg1_uncr).SOPInstanceUID
    finally:
        proc.terminate()
        proc.wait(10)


def _orthanc_tls(pki: Pki) -> dict:
    return {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.server_cert),
        "DicomTlsPrivateKey": str(pki.server_key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }


@pytest.mark.integration
def test_orthanc_over_tls_both_ways(tls_scp, pki, rg1_uncr, tmp_path):
    require_orthanc()
    receiver, index, _ = tls_scp
    host, port = receiver.tls_address
    node = {"AET": "AINODE", "Host": host, "Port": port, "UseDicomTls": True}
    pacs = Orthanc(tmp_path / "orthanc", modalities={"AINODE": node}, extra=_orthanc_tls(pki)).start()
    try:
        # Our SCU -> Orthanc's TLS DicomPort, with our client certificate.
        dest = DicomDestination(kind="dicom", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port, timeout_seconds=10,
                                tls={"ca": str(pki.ca), "certificate": str(pki.client_cert), "key": str(pki.client_key)})
        [outcome] = DicomSender(dest, DestinationContext(calling_ae="AINODE")).send([rg1_uncr])
        assert outcome.ok, outcome
        src = pydicom.dcmread(rg1_uncr, stop_before_pixels=True)
        [instance] = pacs.study_instances(src.StudyInstanceUID)

        # Orthanc -> the node's TLS port: C-ECHO, then C-STORE through REST.
        assert requests.post(f"{pacs.url}/modalities/AINODE/echo", json={}, timeout=30).ok
        r = requests.post(f"{pacs.url}/modalities/AINODE/store", json={"Resources": [instance["ID"]], "Synchronous": True}, timeout=60)
        assert r.ok, r.text
        assert index.counts()["instances"]["total"] == 1
    finally:
        pacs.stop()


@pytest.mark.integration
def test_deployed_autoroute_sends_over_tls(tls_scp, pki, tmp_path):
    """deploy/orthanc/ as shipped, with ORTHANC_NODE_TLS=true and the DicomTls*
    variables: autoroute.lua's SendToModality reaches the node's TLS port."""
    require_orthanc()
    from tests.test_autoroute import _variant

    receiver, index, _ = tls_scp
    pacs = DeployedOrthanc(tmp_path / "orthanc", node_port=receiver.tls_address[1], stable_age=1)
    pacs.env.update({
        "ORTHANC_NODE_TLS": "true",
        "ORTHANC_DICOM_TLS_CERTIFICATE": str(pki.server_cert),
        "ORTHANC_DICOM_TLS_PRIVATE_KEY": str(pki.server_key),
        "ORTHANC_DICOM_TLS_TRUSTED_CERTIFICATES": str(pki.ca),
    })
    pacs.start()
    try:
        assert pacs.get("/modalities?expand")["AINODE"]["UseDicomTls"] is True
        chest = _variant("CT_small.dcm", Modality="CR", BodyPartExamined="CHEST")
        assert pacs.store(chest)["Status"] == "Success"
        wait_for(lambda: index.counts()["instances"]["total"] == 1, 20, 0.1, "the chest CR at the node's TLS port")
        assert any("-> AINODE" in line for line in pacs.lua_lines())
    finally:
        pacs.stop()


def test_cli_echo_uses_tls_for_tls_destinations(tls_scp, pki, tmp_path):
    from typer.testing import CliRunner

    from node.cli import app

    receiver, *_ = tls_scp
    host, port = receiver.tls_address
    config = tmp_path / "node.toml"

    def write(ca: Path) -> Path:
        config.write_text(
            f'[destinations.pacs]\nkind = "dicom"\nae_title = "AINODE"\nhost = "{host}"\nport = {port}\n'
            f'tls = {{ ca = "{ca}", certificate = "{pki.client_cert}", key = "{pki.client_key}" }}\n'
        )
        return config

    ok = CliRunner().invoke(app, ["echo", "--destinations", "--config", str(write(pki.ca))])
    assert ok.exit_code == 0 and "C-ECHO status 0x0000" in ok.output, ok.output
    refused = CliRunner().invoke(app, ["echo", "--destinations", "--config", str(write(pki.other_ca))])
    assert refused.exit_code == 1 and "(DICOM TLS)" in refused.output, refused.output
