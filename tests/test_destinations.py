"""Destinations as plug-ins (node/destinations/): the registry, the
configuration's union built from it, the ``folder`` kind, and each kind's
``echo``.

A fourth kind is registered at runtime through the registry API; a fifth and
sixth, written as files in the test's folder, are found by a fresh process
(one as a module beside the built-ins, one through an ``ainode.destinations``
entry point) whose real ``load_config``, dispatcher and ``ainode echo``
use them with no edit anywhere else.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import pydicom
import pytest
from pydantic import TypeAdapter, ValidationError
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from typer.testing import CliRunner

import node.config
from node.cli import app
from node.destinations import DestinationConfig, DestinationContext, DestinationKind, UnknownKind
from node.destinations.dicom import DicomDestination, DicomSender
from node.destinations.dicomweb import DicomWebDestination, StowSender
from node.destinations.folder import MAX_COMPONENT, FolderDestination, FolderSender, path_component
from node.destinations.registry import DestinationRegistry, discover, registry
from node.destinations.webhook import WebhookDestination
from node.dispatch import Dispatcher
from node.index import Index
from node.outcome import Outcome, OutcomeClass, classify_os_error
from node.spool import Spool
from tests.peers import REPO, free_port, wait_for
from tests.test_dispatch import _config, _queue_result

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))


def _h(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


# -- the registry and the union built from it ------------------------------------------------


def test_built_in_kinds_are_discovered_and_make_the_union():
    found = discover()
    assert found.kinds() == ["dicom", "dicomweb", "folder", "webhook"] and found.errors == []
    assert found.kind("folder") is FolderSender and found.source("folder") == "built-in node.destinations.folder"
    assert found.kind("dicom") is DicomSender and found.kind("dicomweb") is StowSender
    union = get_args(get_args(found.config_union())[0])
    assert set(union) == {DicomDestination, DicomWebDestination, FolderDestination, WebhookDestination}
    # node.config names no kind: its union is the process registry's.
    assert set(get_args(get_args(node.config.Destination)[0])) == set(union)
    assert registry().kinds() == found.kinds()


def test_config_refuses_an_unknown_kind_naming_the_registered_ones(tmp_path):
    with pytest.raises(node.config.ConfigError) as err:
        node.config.load_config(None, destinations={"x": {"kind": "ftp", "path": "/srv"}})
    assert "destinations.x: unknown kind 'ftp'; registered: dicom, dicomweb, folder, webhook" in str(err.value)
    with pytest.raises(node.config.ConfigError, match="destinations.x: kind: missing"):
        node.config.load_config(None, destinations={"x": {"path": "/srv"}})
    with pytest.raises(node.config.ConfigError, match=r"destinations.x.folder.fsnyc: Extra inputs"):
        node.config.load_config(None, destinations={"x": {"kind": "folder", "path": str(tmp_path), "fsnyc": False}})


class MemoryDestination(DestinationConfig):
    """The fourth kind's table."""

    kind: Literal["memory"]
    label: str


class MemorySender(DestinationKind):
    """A fourth kind, defined here and nowhere else: keeps the SOP Instance
    UIDs it is sent, refusing the ones it was told to."""

    kind = "memory"
    Config = MemoryDestination

    def __init__(self, config, context=None):
        super().__init__(config, context)
        self.received: list[str] = []
        self.refuse: set[str] = set()

    @property
    def target(self) -> str:
        return f"memory {self.config.label}"

    def classify(self, result: object) -> OutcomeClass:
        return OutcomeClass.PERMANENT if result in self.refuse else OutcomeClass.SUCCESS

    def echo(self) -> Outcome:
        return Outcome(OutcomeClass.SUCCESS, None, f"{self.config.label} ready")

    def send(self, paths: Sequence[Path]) -> list[Outcome]:
        uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
        self.received += [u for u in uids if u not in self.refuse]
        return [self.outcome(u, None, "refused" if u in self.refuse else "kept") for u in uids]


def test_a_kind_registered_at_runtime_is_parsed_and_sends():
    reg = discover()
    assert reg.register(MemorySender) is MemorySender
    assert reg.kinds() == ["dicom", "dicomweb", "folder", "memory", "webhook"] and reg.source("memory") == "runtime"
    tables = TypeAdapter(dict[str, reg.config_union()]).validate_python({
        "lab": {"kind": "memory", "label": "lab", "timeout_seconds": 5},
        "share": {"kind": "folder", "path": "/srv/share"},
    })
    assert isinstance(tables["lab"], MemoryDestination) and tables["lab"].timeout_seconds == 5
    assert isinstance(tables["share"], FolderDestination)
    with pytest.raises(ValidationError, match="Field required"):
        TypeAdapter(reg.config_union()).validate_python({"kind": "memory"})  # its own fields are checked
    sender = reg.sender(tables["lab"], DestinationContext("lab"))
    assert isinstance(sender, MemorySender) and sender.echo().text == "lab ready"
    uid = pydicom.dcmread(CT_SMALL, stop_before_pixels=True).SOPInstanceUID
    [kept] = sender.send([CT_SMALL])
    sender.refuse.add(uid)
    [refused] = sender.send([CT_SMALL])
    assert (kept.ok, refused.ok, refused.permanent) == (True, False, True) and sender.received == [uid]
    # The process registry is untouched.
    assert "memory" not in registry()


def test_registry_refuses_invalid_kinds():
    reg = DestinationRegistry()
    reg.register(MemorySender)
    with pytest.raises(ValueError, match="'memory' is already registered by runtime"):
        reg.register(MemorySender)

    class WrongLiteral(MemorySender):
        kind = "other"

    with pytest.raises(ValueError, match=r'MemoryDestination.kind must be declared Literal\["other"\]'):
        reg.register(WrongLiteral)

    class BadName(MemorySender):
        kind = "Bad Name"

    with pytest.raises(ValueError, match="kind must be 1-32 of a-z"):
        reg.register(BadName)
    with pytest.raises(ValueError, match="not a concrete"):
        reg.register(DestinationKind)
    with pytest.raises(ValueError, match="not a concrete"):
        reg.register(MemoryDestination)  # type: ignore[arg-type]
    with pytest.raises(UnknownKind, match="unknown kind 'ftp'; registered: memory"):
        reg.kind("ftp")
    with pytest.raises(TypeError, match="FolderSender takes a FolderDestination"):
        FolderSender(MemoryDestination(kind="memory", label="x"))


# -- folder: safe paths ----------------------------------------------------------------------


def test_path_component_keeps_uids_and_marks_every_change():
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    assert path_component(uid) == uid
    assert path_component("PAT001") == "PAT001"
    assert path_component("../x") == f"___x_{_h('../x')}"
    assert path_component("a/b") == f"a_b_{_h('a/b')}"
    assert path_component(".") == f"__{_h('.')}"
    assert path_component("..") == f"___{_h('..')}"
    assert path_component("") == f"UNKNOWN_{_h('')}" == path_component(None)
    assert path_component("Müller^Hans") == f"M_ller_Hans_{_h('Müller^Hans')}"
    long = "P" * 1000
    assert path_component(long) == "P" * (MAX_COMPONENT - 17) + f"_{_h(long)}"
    assert len(path_component(long)) == MAX_COMPONENT
    # No value unchanged can look like a changed one: marker-like endings are marked too.
    disguised = f"a_b_{_h('a/b')}"
    assert path_component(disguised) != path_component("a/b")
    assert len({path_component(v) for v in ("a/b", "a_b", "a b", "a\\b", disguised)}) == 5


def _instance(folder: Path, patient_id: str, n: int) -> tuple[Path, pydicom.Dataset]:
    ds = pydicom.dcmread(CT_SMALL)
    ds.PatientID = patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{n}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_folder_writes_hostile_patient_ids_inside_the_folder_only(tmp_path):
    root = tmp_path / "a" / "b" / "share"
    root.mkdir(parents=True)
    ids = ["../x", "../../../x", "a/b", "/etc/passwd", "", "P" * 1000, "..", "PAT001"]
    sources = [_instance(tmp_path / "src", pid, i) for i, pid in enumerate(ids)]
    sender = FolderSender(FolderDestination(kind="folder", path=root, fsync=True))
    before = _files(tmp_path)
    outcomes = sender.send([p for p, _ in sources])
    assert all(o.ok for o in outcomes), outcomes
    expected_patient = {
        "../x": f"___x_{_h('../x')}",
        "../../../x": f"___.._.._x_{_h('../../../x')}",
        "a/b": f"a_b_{_h('a/b')}",
        "/etc/passwd": f"_etc_passwd_{_h('/etc/passwd')}",
        "": f"UNKNOWN_{_h('')}",
        "P" * 1000: "P" * 47 + f"_{_h('P' * 1000)}",
        "..": f"___{_h('..')}",
        "PAT001": "PAT001",
    }
    written = _files(tmp_path) - before
    want = {root / expected_patient[ds.PatientID] / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            for _, ds in sources}
    # The whole test folder: exactly the expected files appeared, all under the share.
    assert written == want
    for (path, ds), outcome in zip(sources, outcomes, strict=True):
        target = root / expected_patient[ds.PatientID] / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert target.read_bytes() == path.read_bytes()
        assert outcome.text == f"written {target.relative_to(root)}"
    assert all(len(part) <= MAX_COMPONENT + 4 for f in written for part in f.relative_to(root).parts)
    # A re-send replaces the file in place; no temporary file is left.
    assert all(o.ok for o in sender.send([sources[0][0]]))
    assert _files(tmp_path) - before == want


def test_folder_refuses_a_symbolic_link_out_of_it(tmp_path):
    root, outside = tmp_path / "share", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "PAT001").symlink_to(outside)
    path, _ = _instance(tmp_path / "src", "PAT001", 0)
    [outcome] = FolderSender(FolderDestination(kind="folder", path=root)).send([path])
    assert outcome.permanent and "leads outside" in outcome.text
    assert list(outside.iterdir()) == []


# -- folder: outcomes of a missing, unwritable or full folder ---------------------------------


def test_os_errors_are_classified():
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT):
        assert classify_os_error(OSError(code, os.strerror(code))) == OutcomeClass.TRANSIENT, errno.errorcode[code]
    for code in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG):
        assert classify_os_error(OSError(code, os.strerror(code))) == OutcomeClass.PERMANENT, errno.errorcode[code]


def test_missing_folder_is_transient_and_never_created(tmp_path):
    root = tmp_path / "not-mounted"
    path, _ = _instance(tmp_path / "src", "PAT001", 0)
    sender = FolderSender(FolderDestination(kind="folder", path=root))
    [outcome] = sender.send([path])
    echo = sender.echo()
    assert not outcome.ok and not outcome.permanent and "a share not mounted?" in outcome.text
    assert not echo.ok and not echo.permanent
    assert not root.exists()


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs under tmp_path (needs root); yields a function taking mount options."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_unwritable_folder_is_permanent(tmp_path, tmpfs):
    root = tmpfs("readonly", "ro,size=64k")  # as root, EACCES cannot be had by mode bits: EROFS
    path, _ = _instance(tmp_path / "src", "PAT001", 0)
    sender = FolderSender(FolderDestination(kind="folder", path=root))
    [outcome] = sender.send([path])
    assert outcome.permanent and outcome.status == "EROFS", outcome
    echo = sender.echo()
    assert echo.permanent and echo.status == "EROFS" and f"cannot write in {root}" in echo.text


def test_unwritable_folder_by_permissions_is_permanent(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes through mode bits; the read-only mount test covers root")
    root = tmp_path / "share"
    root.mkdir(mode=0o555)
    path, _ = _instance(tmp_path / "src", "PAT001", 0)
    [outcome] = FolderSender(FolderDestination(kind="folder", path=root)).send([path])
    assert outcome.permanent and outcome.status == "EACCES", outcome


def test_full_disk_is_retried_through_dispatch(tmp_path, tmpfs):
    root = tmpfs("full", "size=16k")  # CT_small is 39 kB
    cfg = _config(tmp_path, {"share": {"kind": "folder", "path": str(root)}})
    index = Index(cfg.storage.index_url)
    spool = Spool(cfg.storage.spool_dir, cfg.storage.quarantine_dir, cfg.storage.outbox_dir)
    try:
        _queue_result(cfg, index, spool, CT_SMALL, ["share"])
        echo = FolderSender(cfg.destinations["share"]).echo()
        assert echo.ok, echo  # a small write still fits
        dispatcher = Dispatcher(cfg, index)
        dispatcher.start()
        try:
            wait_for(lambda: index.deliveries()[0].attempts >= 2, 20, what="two attempts on a full disk")
        finally:
            dispatcher.stop()
        (d,) = index.deliveries()
        assert d.state == "pending" and "No space left on device" in d.last_error and "permanent" not in d.last_error
        assert {a.status for a in index.attempts(d.id)} == {"ENOSPC"}
        assert [p for p in root.rglob("*") if p.is_file()] == []  # no partial or temporary file left
    finally:
        index.close()


def test_folder_delivery_through_dispatch(tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    cfg = _config(tmp_path, {"share": {"kind": "folder", "path": str(root), "fsync": False}})
    index = Index(cfg.storage.index_url)
    spool = Spool(cfg.storage.spool_dir, cfg.storage.quarantine_dir, cfg.storage.outbox_dir)
    try:
        uid = _queue_result(cfg, index, spool, CT_SMALL, ["share"])
        dispatcher = Dispatcher(cfg, index)
        dispatcher.start()
        try:
            wait_for(lambda: index.deliveries()[0].state == "delivered", 20, what="delivery to the folder")
        finally:
            dispatcher.stop()
    finally:
        index.close()
    src = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    [written] = [p for p in root.rglob("*") if p.is_file()]
    assert written == root / "1CT1" / src.StudyInstanceUID / src.SeriesInstanceUID / f"{uid}.dcm"
    assert pydicom.dcmread(written).SOPInstanceUID == uid


# -- echo: each kind's own check ----------------------------------------------------------------


class QidoServer:
    """Answers ``GET /dicom-web/studies`` with 200 and an empty list when the
    Authorization header is ``expected``, else 401; records each query."""

    def __init__(self, expected: str):
        self.queries: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.queries.append(self.path)
                ok = self.headers.get("Authorization") == expected and self.path.startswith("/dicom-web/studies")
                body = b"[]" if ok else b""
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_dicomweb_echo_is_a_qido_query_with_the_credentials():
    server = QidoServer("Bearer tok-123456")
    try:
        good = StowSender(DicomWebDestination(kind="dicomweb", url=server.url, auth={"type": "bearer", "token": "tok-123456"}))
        bad = StowSender(DicomWebDestination(kind="dicomweb", url=server.url, auth={"type": "bearer", "token": "wrong-token"}))
        ok, refused = good.echo(), bad.echo()
    finally:
        server.stop()
    assert ok.ok and ok.status == "200" and "QIDO-RS GET" in ok.text
    assert refused.permanent and refused.status == "401"
    assert server.queries == ["/dicom-web/studies?limit=1"] * 2
    down = StowSender(DicomWebDestination(kind="dicomweb", url=f"http://127.0.0.1:{free_port()}/dicom-web")).echo()
    assert not down.ok and not down.permanent and "connection refused" in down.text


def test_cli_echo_checks_every_kind_against_real_peers(tmp_path, orthanc):
    share = tmp_path / "share"
    share.mkdir()
    toml = tmp_path / "node.toml"
    toml.write_text(textwrap.dedent(f"""
        [node]
        ae_title = "AINODE"
        [destinations.pacs]
        kind = "dicom"
        ae_title = "{orthanc.aet}"
        host = "127.0.0.1"
        port = {orthanc.dicom_port}
        [destinations.web]
        kind = "dicomweb"
        url = "{orthanc.dicomweb_url}"
        [destinations.share]
        kind = "folder"
        path = "{share}"
    """))
    result = CliRunner().invoke(app, ["echo", "--destinations", "--config", str(toml)])
    assert result.exit_code == 0, result.output
    lines = sorted(result.output.splitlines())
    assert lines[0] == f"pacs (dicom): {orthanc.aet}@127.0.0.1:{orthanc.dicom_port} C-ECHO status 0x0000 (Success)"
    assert lines[1].startswith(f"share (folder): folder {share} {share} is writable")
    assert lines[2] == f"web (dicomweb): {orthanc.dicomweb_url} QIDO-RS GET {orthanc.dicomweb_url}/studies?limit=1: HTTP 200 OK"
    assert list(share.iterdir()) == []  # the test write is gone
    toml.write_text(toml.read_text().replace(str(share), str(tmp_path / "absent")))
    result = CliRunner().invoke(app, ["echo", "--destinations", "--config", str(toml)])
    assert result.exit_code == 1 and "a share not mounted?" in result.output


# -- a new kind is a new file: found by a fresh process, no edit elsewhere --------------------

KIND_MODULE = '''
from pathlib import Path
from typing import Literal

import pydicom

from node.destinations.base import DestinationConfig, DestinationKind
from node.outcome import Outcome, OutcomeClass


class {Name}Destination(DestinationConfig):
    kind: Literal["{kind}"]
    log: Path


class {Name}Sender(DestinationKind):
    """Appends the SOP Instance UID of each file it is sent to ``log``."""

    kind = "{kind}"
    Config = {Name}Destination

    @property
    def target(self):
        return f"log {{self.config.log}}"

    def classify(self, result):
        return OutcomeClass.SUCCESS if result is None else OutcomeClass.TRANSIENT

    def echo(self):
        return Outcome(OutcomeClass.SUCCESS, None, "{kind} ready")

    def send(self, paths):
        outcomes = []
        for p in paths:
            uid = pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
            with open(self.config.log, "a") as f:
                f.write(uid + "\\n")
            outcomes.append(self.outcome(None, None, "logged"))
        return outcomes
'''

DRIVER = '''
import json, sys
import node.destinations as package
package.__path__.append(sys.argv[1])  # a module dropped beside the built-ins
from typer.testing import CliRunner
from node.cli import app
from node.config import ConfigError, load_config
from node.destinations.registry import registry
from node.dispatch import Dispatcher
from node.index import Index
from node.spool import Spool
from tests.peers import wait_for
from tests.test_dispatch import _queue_result

cfg = load_config(sys.argv[2])
index = Index(cfg.storage.index_url)
spool = Spool(cfg.storage.spool_dir, cfg.storage.quarantine_dir, cfg.storage.outbox_dir)
uid = _queue_result(cfg, index, spool, sys.argv[3], list(cfg.destinations))
dispatcher = Dispatcher(cfg, index)
dispatcher.start()
try:
    wait_for(lambda: all(d.state == "delivered" for d in index.deliveries()), 20, what="deliveries")
finally:
    dispatcher.stop()
echo = CliRunner().invoke(app, ["echo", "--destinations", "--config", sys.argv[2]])
try:
    load_config(None, destinations={"x": {"kind": "broken"}})
    refused = None
except ConfigError as exc:
    refused = str(exc)
print(json.dumps({
    "kinds": registry().kinds(), "errors": registry().errors, "uid": uid,
    "types": {n: type(d).__name__ for n, d in cfg.destinations.items()},
    "states": {d.destination: d.state for d in index.deliveries()},
    "echo": [echo.exit_code, echo.output], "refused": refused,
}))
'''


def test_new_kinds_need_only_their_file(tmp_path):
    kinds, site = tmp_path / "kinds", tmp_path / "site"
    kinds.mkdir()
    (kinds / "memlog.py").write_text(KIND_MODULE.format(Name="Memlog", kind="memlog"))
    (site / "thirdparty_kind").mkdir(parents=True)
    (site / "thirdparty_kind" / "__init__.py").write_text(KIND_MODULE.format(Name="Third", kind="thirdparty"))
    dist = site / "thirdparty_kind-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-kind\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[ainode.destinations]\nthirdparty = thirdparty_kind:ThirdSender\nbroken = no_such_module:Sender\n"
    )
    share = tmp_path / "share"
    share.mkdir()
    toml = tmp_path / "node.toml"
    toml.write_text(textwrap.dedent(f"""
        [storage]
        spool_dir = "{tmp_path / 'spool'}"
        quarantine_dir = "{tmp_path / 'q'}"
        outbox_dir = "{tmp_path / 'outbox'}"
        index_url = "sqlite:///{tmp_path / 'index.db'}"
        [destinations.lab]
        kind = "memlog"
        log = "{tmp_path / 'memlog.txt'}"
        [destinations.vendor]
        kind = "thirdparty"
        log = "{tmp_path / 'third.txt'}"
        [destinations.share]
        kind = "folder"
        path = "{share}"
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(kinds), str(toml), str(CT_SMALL)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["kinds"] == ["dicom", "dicomweb", "folder", "memlog", "thirdparty", "webhook"]
    assert out["types"] == {"lab": "MemlogDestination", "vendor": "ThirdDestination", "share": "FolderDestination"}
    assert out["states"] == {"lab": "delivered", "vendor": "delivered", "share": "delivered"}
    assert (tmp_path / "memlog.txt").read_text() == (tmp_path / "third.txt").read_text() == out["uid"] + "\n"
    assert len([p for p in share.rglob("*.dcm")]) == 1
    code, echo = out["echo"]
    assert code == 0 and f"lab (memlog): log {tmp_path / 'memlog.txt'} memlog ready" in echo and "thirdparty ready" in echo
    # A plug-in that cannot load is reported, not fatal, and named where a destination uses it.
    [error] = out["errors"]
    assert error.startswith("entry point thirdparty-kind 0.1: broken = no_such_module:Sender: cannot load: ModuleNotFoundError")
    registered = "registered: dicom, dicomweb, folder, memlog, thirdparty, webhook"
    assert f"unknown kind 'broken'; {registered}; not registered: entry point" in out["refused"]
