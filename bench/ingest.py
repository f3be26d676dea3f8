"""Ingest benchmark: the node's SCP against dcmtk storescp and Orthanc, same run.

Test load (docs/architecture.md, "Measured anchors"): 300 CT instances of 512x512
(~157 MB), sent by dcmtk ``storescu`` on one association with
``TCP_NODELAY=1`` (given to every dcmtk-based peer, Orthanc included). Each receiver runs on a free loopback port in a temporary
folder; the wall time of the whole ``storescu`` run is measured.

Prints one JSON object. Usage::

    .venv/bin/python bench/ingest.py [--instances 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.peers import Orthanc, free_port, node_config_for, wait_for  # noqa: E402


def make_ct_series(folder: Path, n: int) -> list[Path]:
    """``n`` CT slices, 512x512 int16, one series, from pydicom's CT_small header."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(n):
        ds = copy.deepcopy(template)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.Rows = ds.Columns = 512
        ds.PixelData = rng.integers(-1000, 2000, (512, 512), dtype=np.int16).tobytes()
        path = folder / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def send(files: list[Path], port: int, aet: str) -> float:
    env = {**os.environ, "TCP_NODELAY": "1"}
    t = time.perf_counter()
    out = subprocess.run(["storescu", "-aec", aet, "127.0.0.1", str(port), *map(str, files)], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed: {out.stderr[-2000:]}")
    return elapsed


def bench_storescp(files, workdir: Path) -> float:
    port = free_port()
    out = workdir / "storescp"
    out.mkdir()
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)], stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)], capture_output=True).returncode == 0, 10)
        return send(files, port, "STORESCP")
    finally:
        proc.terminate()
        proc.wait()


def bench_orthanc(files, workdir: Path) -> float:
    os.environ["TCP_NODELAY"] = "1"  # Orthanc's DICOM layer is dcmtk's
    pacs = Orthanc(workdir / "orthanc").start()
    try:
        return send(files, pacs.dicom_port, pacs.aet)
    finally:
        pacs.stop()


def bench_node(files, workdir: Path, fsync: bool) -> float:
    from node.index import Index
    from node.receive import Receiver
    from node.spool import Spool

    port = free_port()
    cfg = node_config_for(workdir, node={"bind_address": "127.0.0.1", "port": port}, storage={"fsync": fsync})
    index = Index(cfg.storage.index_url)
    spool = Spool(cfg.storage.spool_dir, cfg.storage.quarantine_dir, cfg.storage.outbox_dir, fsync=fsync)
    receiver = Receiver(cfg, spool, index)
    receiver.start()
    try:
        elapsed = send(files, port, "AINODE")
        stored = index.counts()["instances"]["total"]
        if stored != len(files):
            raise RuntimeError(f"node indexed {stored} of {len(files)} instances")
        return elapsed
    finally:
        receiver.stop()
        index.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from node.log import configure_logging

    configure_logging("WARNING")
    root = Path(tempfile.mkdtemp(prefix="ainode-bench-"))
    try:
        src = root / "src"
        src.mkdir()
        files = make_ct_series(src, args.instances)
        total = sum(f.stat().st_size for f in files)
        runs: dict[str, list[float]] = {"dcmtk_storescp": [], "orthanc": [], "ainode_fsync": [], "ainode_no_fsync": []}
        for i in range(args.repeat):
            for name, fn in (
                ("dcmtk_storescp", lambda d: bench_storescp(files, d)),
                ("orthanc", lambda d: bench_orthanc(files, d)),
                ("ainode_fsync", lambda d: bench_node(files, d, True)),
                ("ainode_no_fsync", lambda d: bench_node(files, d, False)),
            ):
                work = root / f"{name}-{i}"
                work.mkdir()
                runs[name].append(fn(work))
                shutil.rmtree(work)
        result = {
            "benchmark": "ingest",
            "instances": args.instances,
            "megabytes": round(total / 1e6, 1),
            "repeat": args.repeat,
            "cpu_count": os.cpu_count(),
            "median_seconds": {k: round(statistics.median(v), 3) for k, v in runs.items()},
            "instances_per_second": {k: round(args.instances / statistics.median(v), 1) for k, v in runs.items()},
            "all_seconds": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
