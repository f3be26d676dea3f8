"""Real peers and measurements for the reliability campaign.

The node runs as its own process (``python -m node serve``, as
:class:`tests.peers.NodeProcess` starts it), results arrive at dcmtk's
``storescp`` with unique file names (``+uf``: every arrival is its own file,
so a re-send or a duplicate is counted, where a PACS would keep one copy per
SOP Instance UID), and modalities are dcmtk ``storescu`` and pynetdicom SCUs
that stream files byte for byte (``STORE_SEND_CHUNKED_DATASET``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.peers import REPO, NodeProcess, free_port, node_sections, wait_for, write_node_toml

ARTIFACTS = REPO / "test-artifacts" / "reliability"
NODE_AE = "AINODE"
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
}
CHEST_ROUTE = {
    "name": "chest-pneumonia",
    "pipeline": "pneumonia",
    "match": {"Modality": ["CR", "DX"], "BodyPartExamined": ["CHEST", ""]},
}


def report(name: str, figures: dict) -> dict:
    """Print one JSON line of figures and keep it as
    ``test-artifacts/reliability/<name>.json`` (git-ignored)."""
    line = {"test": name, **figures}
    print(json.dumps(line, default=str))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(line, indent=2, default=str))
    return line


# -- synthetic instances -------------------------------------------------------------


def _chest_pixels(rows: int = 320) -> np.ndarray:
    """RG1_UNCR (a real CR chest PA from pydicom-data) downscaled, so a job
    takes about a second on a CPU."""
    from pydicom.data import get_testdata_file

    src = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")).pixel_array
    step = max(1, src.shape[0] // rows)
    return np.ascontiguousarray(src[::step, ::step]).astype(np.uint16)


class InstanceFactory:
    """Small synthetic CT, MR and CR instances, Explicit VR Little Endian.

    CT and MR are 64x64 16-bit noise; CR is a downscaled real chest PA,
    MONOCHROME1, routed to the pneumonia pipeline.
    """

    def __init__(self, size: int = 64, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.size = size
        self._chest: np.ndarray | None = None

    def dataset(
        self,
        modality: str,
        study_uid: str,
        series_uid: str,
        number: int,
        frame_uid: str | None = None,
        chest: bool = True,
    ) -> Dataset:
        """One instance; a CR is the real chest image unless ``chest=False``
        (then 128x128 noise, for load)."""
        ds = Dataset()
        ds.SOPClassUID = SOP_CLASS[modality]
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = modality
        ds.PatientName, ds.PatientID = "RELIABILITY^TEST", "REL-" + study_uid[-8:]
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240102", "101010", "A" + study_uid[-6:]
        ds.SeriesNumber, ds.InstanceNumber = 1, number
        ds.SeriesDescription = f"reliability {modality}"
        ds.Manufacturer = "reliability-campaign"
        ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        if modality == "CR" and chest:
            if self._chest is None:
                self._chest = _chest_pixels()
            pixels = self._chest
            ds.PhotometricInterpretation = "MONOCHROME1"
            ds.BitsStored, ds.HighBit = 15, 14
            ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
            ds.ImagerPixelSpacing = [0.8, 0.8]
        elif modality == "CR":
            pixels = self.rng.integers(0, 4096, (128, 128), dtype=np.uint16)
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BodyPartExamined = "CHEST"
        else:
            pixels = self.rng.integers(0, 4096, (self.size, self.size), dtype=np.uint16)
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.ImagePositionPatient = [0, 0, float(number)]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
            ds.FrameOfReferenceUID = frame_uid or generate_uid()
            if modality == "CT":
                ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        return ds

    def series(
        self, outdir: Path, modality: str, n: int, study_uid: str | None = None, chest: bool = True
    ) -> list[Path]:
        """Write ``n`` instances of one new series under ``outdir``."""
        outdir.mkdir(parents=True, exist_ok=True)
        study_uid = study_uid or generate_uid()
        series_uid, frame_uid = generate_uid(), generate_uid()
        paths = []
        for i in range(n):
            ds = self.dataset(modality, study_uid, series_uid, i + 1, frame_uid, chest)
            path = outdir / f"{ds.SOPInstanceUID}.dcm"
            save(ds, path)
            paths.append(path)
        return paths


def save(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a DICOM file after its preamble and file meta: what went
    over the network (the receiver writes its own file meta, PS3.10 7.1)."""
    _, offset = split_dataset(Path(path))
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read()


def temporary_files(*roots: Path) -> list[Path]:
    """write_durable's temporary files (``.<name>.<hex>.tmp``) under ``roots``."""
    return sorted(p for root in roots if root.exists() for p in root.rglob(".*.tmp"))


# -- the node as a process -----------------------------------------------------------------


@dataclass
class NodeSetup:
    """A configuration file for ``ainode serve`` and what the test needs of it."""

    workdir: Path
    config_path: Path
    port: int
    api_port: int
    ae_title: str
    spool: Path
    quarantine: Path
    outbox: Path
    index_db: Path

    @property
    def folders(self) -> tuple[Path, ...]:
        return (self.spool, self.quarantine, self.outbox)


def write_config(
    workdir: Path,
    *,
    destinations: dict[str, dict] | None = None,
    routes: Sequence[dict] = (),
    storage: dict | None = None,
    completion: dict | None = None,
    retry: dict | None = None,
    worker: dict | None = None,
    data_dir: Path | None = None,
) -> NodeSetup:
    """Write ``workdir/node.toml``: the node on free loopback ports, its
    files under ``data_dir`` (default ``workdir/var``), SQLite index."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = data_dir or workdir / "var"
    port, api_port = free_port(), free_port()
    sections = node_sections(
        data,
        node={"ae_title": NODE_AE, "bind_address": "127.0.0.1", "port": port},
        storage=storage or {},
        completion={"sweep_interval_seconds": 0.5, "series_idle_seconds": 3, "complete_on_release": True}
        | (completion or {}),
        retry={"max_attempts": 200, "initial_delay_seconds": 0.3, "multiplier": 1.5, "max_delay_seconds": 1.5}
        | (retry or {}),
        # One torch thread leaves a core to the rest; without routes torch is
        # never imported (setting threads would import it).
        worker=({"torch_threads": 1} if routes else {}) | (worker or {}),
        api={"bind_address": "127.0.0.1", "port": api_port},
        routes=list(routes),
        destinations=destinations or {},
    )
    path = write_node_toml(workdir / "node.toml", sections)
    return NodeSetup(
        workdir, path, port, api_port, NODE_AE, data / "spool", data / "quarantine", data / "outbox", data / "index.db"
    )


class Node:
    """``ainode serve`` for one :class:`NodeSetup`: start, SIGKILL, stop, and
    read-only looks at its SQLite index."""

    def __init__(self, setup: NodeSetup):
        self.setup = setup
        self.process = NodeProcess(setup.config_path, setup.workdir)
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.process.proc.pid if self.process.proc else None

    def alive(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    def start(self, timeout: float = 90) -> Node:
        try:
            self.process.start(self.setup.api_port, timeout)
        except TimeoutError as exc:
            tail = self.process.log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"the node did not start: {exc}\n{tail}") from None
        self.starts += 1
        return self

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.stop()

    def wait_ready(self, pipeline: str = "pneumonia", timeout: float = 90) -> None:
        """Until the pipeline's model is loaded (since the latest start)."""

        def ready() -> bool:
            events = [e.get("event") for e in self.process.log_lines()]
            return "pipeline_ready" in events[max(i for i, e in enumerate(events) if e == "node_started") :]

        wait_for(ready, timeout, 0.2, "pipeline ready")

    def query(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(f"file:{self.setup.index_db}?mode=ro", uri=True, timeout=30) as c:
            return c.execute(sql, args).fetchall()

    def echo(self) -> bool:
        return echo(self.setup.port, self.setup.ae_title)

    def log_events(self, name: str) -> list[dict]:
        return [e for e in self.process.log_lines() if e.get("event") == name]


# -- peers ----------------------------------------------------------------------------------


class DcmtkStoreSCP:
    """dcmtk ``storescp +uf``: every arrival kept as its own file.

    ``sleep_during`` (s) holds each C-STORE open that long (``--sleep-during``),
    so a kill can land in the middle of a delivery.
    """

    def __init__(self, outdir: Path, aet: str = "RESULTS", sleep_during: int = 0):
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = free_port()
        self.sleep_during = sleep_during
        self.proc: subprocess.Popen | None = None

    def destination(self, **extra) -> dict:
        return {"kind": "dicom", "ae_title": self.aet, "host": "127.0.0.1", "port": self.port} | extra

    def start(self) -> DcmtkStoreSCP:
        cmd = ["storescp", "+uf", "-od", str(self.outdir), "-aet", self.aet]
        if self.sleep_during:
            cmd += ["--sleep-during", str(self.sleep_during)]
        log = open(self.outdir.parent / f"storescp-{self.aet}.log", "ab")
        self.proc = subprocess.Popen([*cmd, str(self.port)], stdout=log, stderr=log)
        wait_for(lambda: echo(self.port, self.aet), 20, 0.1, "storescp")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self, sleep_during: int = 0) -> DcmtkStoreSCP:
        """Same port and folder, another ``sleep_during``."""
        self.stop()
        self.sleep_during = sleep_during
        return self.start()

    def arrivals(self) -> list[Arrival]:
        """Every object received, in file name order (unreadable ones have
        ``sop_instance_uid`` None)."""
        out = []
        for path in sorted(self.outdir.iterdir()):
            if path.is_file():
                out.append(Arrival.read(path))
        return out


@dataclass(frozen=True)
class Arrival:
    """A derived object as it arrived: which source image, pipeline and model
    version it is for (the identity that must have a single SOP Instance UID)."""

    path: Path
    sop_instance_uid: str | None
    modality: str | None = None
    source: str | None = None
    model: str | None = None

    @classmethod
    def read(cls, path: Path) -> Arrival:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            return cls(path, None)
        sources = sorted(
            {
                item.ReferencedSOPInstanceUID
                for s in ds.get("ReferencedSeriesSequence", [])
                for item in s.get("ReferencedInstanceSequence", [])
            }
            | {
                item.ReferencedSOPInstanceUID
                for st in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                for s in st.get("ReferencedSeriesSequence", [])
                for item in s.get("ReferencedSOPSequence", [])
            }
        )
        model = "|".join(
            str(ds.get(k, "")) for k in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "SeriesDescription")
        )
        return cls(path, str(ds.SOPInstanceUID), str(ds.Modality), ",".join(sources), model)


def duplicates(arrivals: Iterable[Arrival]) -> tuple[dict[tuple, set[str]], int]:
    """Group arrivals by (source, modality, model); returns the groups and
    how many arrivals re-sent an already received SOP Instance UID."""
    groups: dict[tuple, set[str]] = {}
    seen: set[str] = set()
    resent = 0
    for a in arrivals:
        if a.sop_instance_uid is None:
            continue
        groups.setdefault((a.source, a.modality, a.model), set()).add(a.sop_instance_uid)
        resent += a.sop_instance_uid in seen
        seen.add(a.sop_instance_uid)
    return groups, resent


class SilentListener:
    """A TCP port that accepts connections and never answers: a peer that
    hangs, the worst kind of dead destination."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self._held.append(conn)
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        for c in self._held:
            c.close()
        self.sock.close()


def echo(port: int, ae_title: str) -> bool:
    ae = AE(ae_title="RELECHO")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


@dataclass
class Sent:
    path: Path
    status: int | None  # None: no response (association lost)
    seconds: float


def streaming():
    """pynetdicom sends a file path without decoding or re-encoding it:
    the dataset bytes after the file meta go out as they are."""
    return _config, "STORE_SEND_CHUNKED_DATASET"


def store(port: int, ae_title: str, paths: Sequence[Path], calling: str = "RELSCU", timeout: float = 60) -> list[Sent]:
    """C-STORE ``paths`` on one association, file by file as they are on disk
    (requires ``STORE_SEND_CHUNKED_DATASET``); stops at the first lost
    response. Each send is timed on the SCU side (request out to response in)."""
    contexts = []
    for p in paths:
        meta, _ = split_dataset(Path(p))
        pair = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        if pair not in contexts:
            contexts.append(pair)
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    for sop_class, ts in contexts[:128]:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"association to {ae_title}@127.0.0.1:{port} not established")
    out: list[Sent] = []
    try:
        for p in paths:
            t = time.perf_counter()
            try:
                status = assoc.send_c_store(Path(p))
            except RuntimeError:  # the association is gone
                out.append(Sent(Path(p), None, time.perf_counter() - t))
                break
            seconds = time.perf_counter() - t
            code = int(status.Status) if status and "Status" in status else None
            out.append(Sent(Path(p), code, seconds))
            if code is None:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return out


_STORESCU_SENDING = re.compile(r"Sending file: (.+)$")
_STORESCU_RESPONSE = re.compile(r"Received Store Response \((.+?)\)")


def storescu_verbose(paths: Sequence[Path], port: int, ae_title: str, calling: str = "STORESCU") -> list[tuple[Path, bool]]:
    """dcmtk ``storescu -v`` (TCP_NODELAY=1) on one association; returns
    each file with whether its C-STORE response was Success."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    cmd = ["storescu", "-v", "-aet", calling, "-aec", ae_title, "127.0.0.1", str(port), *map(str, paths)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    outcome: dict[Path, bool] = {}
    current = None
    for line in (run.stdout + run.stderr).splitlines():
        if m := _STORESCU_SENDING.search(line):
            current = Path(m.group(1).strip())
        elif (m := _STORESCU_RESPONSE.search(line)) and current is not None:
            outcome[current] = m.group(1) == "Success"
            current = None
    return [(Path(p), outcome.get(Path(p), False)) for p in paths]


@dataclass
class Tally:
    """What senders saw, shared between threads."""

    acknowledged: dict[str, Path] = field(default_factory=dict)  # SOP Instance UID -> file sent
    refused: list[tuple[Path, int]] = field(default_factory=list)
    lost: int = 0  # C-STOREs without a response (the node died under them)
    seconds: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sent: Sent) -> None:
        with self.lock:
            self.seconds.append(sent.seconds)
            if sent.status == 0:
                self.acknowledged[sent.path.stem] = sent.path
            elif sent.status is None:
                self.lost += 1
            else:
                self.refused.append((sent.path, sent.status))


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0
