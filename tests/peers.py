"""Real peers for integration tests: Orthanc, the node as a process, dcmtk.

Nothing here imitates a PACS: :class:`Orthanc` runs the Debian ``Orthanc``
binary with the DICOMweb plugin on free loopback ports,
:class:`DeployedOrthanc` runs it with ``deploy/orthanc/`` exactly as shipped
(auto-routing to the node), and :func:`storescu` runs dcmtk's.
:func:`node_config_for` and :func:`write_node_toml` give the node itself a
configuration whose files lie in the test's folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:  # bench/ imports this module before it measures memory
    from node.config import NodeConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ORTHANC_BIN = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: The Orthanc configuration we ship (loads deploy/orthanc/autoroute.lua).
DEPLOY_CONFIG = REPO / "deploy" / "orthanc" / "orthanc.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # a peer still starting refuses connections
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def have_orthanc() -> bool:
    return Path(ORTHANC_BIN).exists() and DICOMWEB_PLUGIN.exists()


def have_dcmtk() -> bool:
    return shutil.which("storescu") is not None


def require_orthanc() -> None:
    """Fail (not skip), naming the Debian packages, where Orthanc is missing."""
    import pytest

    if not have_orthanc():
        pytest.fail("Orthanc with the DICOMweb plugin is required: apt-get install orthanc orthanc-dicomweb")


class Orthanc:
    """A real Orthanc with the DICOMweb plugin, in a folder of its own.

    ``stop()`` then ``start()`` restarts it on the same ports and storage, as
    a PACS that went down and came back.
    """

    def __init__(self, workdir: Path, *, aet: str = "ORTHANC", modalities: dict | None = None, extra: dict | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        cfg = {
            "Name": "test-pacs",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": modalities or {},
            "StableAge": 2,
            "HttpCompressionEnabled": False,
        }
        cfg.update(extra or {})
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(cfg, indent=2))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Orthanc:
        log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC_BIN, str(self.config_path)], stdout=log, stderr=log, cwd=self.workdir)
        wait_for(lambda: requests.get(f"{self.url}/system", timeout=1).ok, timeout, what="Orthanc HTTP")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def get(self, path: str, **kw):
        r = requests.get(f"{self.url}{path}", timeout=10, **kw)
        r.raise_for_status()
        return r.json()

    def study_instances(self, study_uid: str) -> list[dict]:
        """Instances of a study (Orthanc tags, simplified), [] when absent."""
        found = requests.post(
            f"{self.url}/tools/find",
            json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
            timeout=10,
        )
        found.raise_for_status()
        return found.json()

    def instances_by_modality(self, study_uid: str) -> dict[str, list[str]]:
        """Modality -> Orthanc instance ids, for one study."""
        out: dict[str, list[str]] = {}
        for inst in self.study_instances(study_uid):
            series = self.get(f"/instances/{inst['ID']}/series")
            out.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(inst["ID"])
        return out

    def series_instances(self, study_uid: str, **query: str) -> list[list[str]]:
        """Instance ids of each series of the study whose series-level tags
        match ``query`` (e.g. ``Modality="SEG"``): one /tools/find, not one
        request per instance."""
        found = requests.post(
            f"{self.url}/tools/find",
            json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid, **query}},
            timeout=10,
        )
        found.raise_for_status()
        return [self.get(f"/series/{series_id}")["Instances"] for series_id in found.json()]

    def file(self, instance_id: str) -> bytes:
        r = requests.get(f"{self.url}/instances/{instance_id}/file", timeout=30)
        r.raise_for_status()
        return r.content


class DeployedOrthanc(Orthanc):
    """Orthanc started with ``deploy/orthanc/orthanc.json`` as it is.

    The file reads ports, storage and the node's address from ``ORTHANC_*``
    environment variables (``${VAR:-default}``); nothing else is changed.
    ``stable_age`` is in seconds (the shipped default is 5; 1 keeps tests
    short). The REST helpers are :class:`Orthanc`'s.
    """

    def __init__(self, workdir: Path, *, node_port: int, stable_age: int = 1):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = "ORTHANC"
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.config_path = DEPLOY_CONFIG
        self.log_path = self.workdir / "orthanc.log"
        self.env = {
            "ORTHANC_HTTP_PORT": str(self.http_port),
            "ORTHANC_DICOM_PORT": str(self.dicom_port),
            "ORTHANC_STORAGE_DIR": str(self.workdir / "db"),
            "ORTHANC_NODE_AET": "AINODE",
            "ORTHANC_NODE_HOST": "127.0.0.1",
            "ORTHANC_NODE_PORT": str(node_port),
            "ORTHANC_STABLE_AGE": str(stable_age),
        }
        self.proc = None

    def start(self, timeout: float = 30) -> DeployedOrthanc:
        # Unset inherited ORTHANC_* so only our values (or the file's
        # defaults) apply.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORTHANC_")} | self.env
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([ORTHANC_BIN, str(DEPLOY_CONFIG)], stdout=log, stderr=log, cwd=self.workdir, env=env)
        wait_for(lambda: requests.get(f"{self.url}/system", timeout=1).ok, timeout, what="Orthanc HTTP")
        return self

    def lua_lines(self) -> list[str]:
        """What autoroute.lua printed: its routing decisions."""
        text = self.log_path.read_text(errors="replace")
        return re.findall(r"Lua says: (ainode: .*)", text)

    def store(self, path_or_bytes: Path | bytes) -> dict:
        """``POST /instances``, as a modality's upload or a user's import."""
        body = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
        r = requests.post(f"{self.url}/instances", data=body, timeout=60)
        r.raise_for_status()
        return r.json()


# storescu proposes only uncompressed syntaxes unless told which compressed
# one to offer; a modality holding compressed images offers theirs.
_STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated
}


def storescu(
    files: list[Path], port: int, called_aet: str, calling_aet: str = "STORESCU", host: str = "127.0.0.1"
) -> subprocess.CompletedProcess:
    """Send ``files`` with dcmtk's storescu on one association, proposing the
    files' own (compressed) transfer syntax where they have one.

    TCP_NODELAY=1: without it Nagle's algorithm adds ~40 ms an instance.
    """
    import pydicom

    env = {**os.environ, "TCP_NODELAY": "1"}
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    flags = sorted({_STORESCU_PROPOSE[ts] for ts in syntaxes if ts in _STORESCU_PROPOSE})
    if len(flags) > 1:
        raise ValueError(f"storescu proposes one compressed syntax per run; got files in {sorted(syntaxes)}")
    cmd = ["storescu", *flags, "-aet", calling_aet, "-aec", called_aet, host, str(port), *map(str, files)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


# -- the node's configuration -------------------------------------------------------


def node_sections(folder: Path, **sections: Any) -> dict[str, Any]:
    """Configuration sections for a node whose files lie under ``folder``:
    ``spool/``, ``quarantine/``, ``outbox/`` and the SQLite index ``index.db``.

    The keys of a ``storage`` section given are laid over those (e.g.
    ``storage={"fsync": False}``); every other section is taken as given, as
    :func:`node.config.load_config` takes it.
    """
    folder = Path(folder)
    storage = {
        "spool_dir": str(folder / "spool"),
        "quarantine_dir": str(folder / "quarantine"),
        "outbox_dir": str(folder / "outbox"),
        "index_url": f"sqlite:///{folder / 'index.db'}",
    } | sections.pop("storage", {})
    return {"storage": storage, **sections}


def node_config_for(folder: Path, **sections: Any) -> NodeConfig:
    """The node's configuration, its files under ``folder`` (:func:`node_sections`).

    The ``node_config`` fixture (tests/conftest.py) is this bound to ``tmp_path``.
    """
    from node.config import load_config

    return load_config(None, **node_sections(folder, **sections))


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def write_node_toml(path: Path, sections: dict[str, Any], *toml: str) -> Path:
    """Write ``sections`` (as :func:`node.config.load_config` takes them) to
    ``path`` as the TOML file ``ainode`` reads, then each ``toml`` text as it
    is (e.g. ``[[routes]]`` tables kept as text); return ``path``.

    A section that is a list (``routes``) becomes an array of tables; a table
    within a section (a destination, ``api.tls``) is written inline.
    """
    lines: list[str] = []
    for name, value in sections.items():
        for table in value if isinstance(value, list) else [value]:
            lines.append(f"[[{name}]]" if isinstance(value, list) else f"[{name}]")
            lines += [f"{_toml_key(k)} = {_toml(v)}" for k, v in table.items()]
            lines.append("")
    path = Path(path)
    path.write_text("\n".join([*lines, *toml]) + "\n", encoding="utf-8")
    return path


class NodeProcess:
    """``ainode serve`` as a separate process, to be stopped or killed."""

    def __init__(self, config_path: Path, workdir: Path, env: dict | None = None):
        self.config_path = config_path
        self.workdir = workdir
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "node.log"

    def start(self, api_port: int, timeout: float = 60) -> NodeProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            cwd=self.workdir,
            env=self.env,
        )
        wait_for(
            lambda: self.proc.poll() is None and requests.get(f"http://127.0.0.1:{api_port}/health", timeout=1).ok,
            timeout,
            what="node health",
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up, as a crash or power cut would leave it."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_lines(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
