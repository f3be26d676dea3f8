"""Outages and a full disk.

- A real Orthanc is killed while the node runs a job and restarted later: the
  results reach it after it returns. Beside it, one destination is a closed
  port and one accepts TCP and never answers; the fourth (dcmtk storescp)
  still receives within seconds: one dead destination never delays another.
- The free-space guard (``[storage] min_free_mb`` / ``min_free_percent``)
  answers C-STORE 0xA700 and writes nothing: no file, no index row, no
  quarantine (a full disk is the node's fault, not the data's).
- As root, a small tmpfs filled for real: C-STORE 0xA700, nothing half
  written; once space returns the same instances are stored, by the same
  process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.peers import Orthanc, free_port, require_orthanc, wait_for
from tests.reliability.support import (
    CHEST_ROUTE,
    DcmtkStoreSCP,
    Node,
    SilentListener,
    dataset_bytes,
    report,
    store,
    temporary_files,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _job_state(node: Node) -> str | None:
    rows = node.query("SELECT state FROM jobs ORDER BY id DESC LIMIT 1")
    return rows[0][0] if rows else None


def _attempts(node: Node, destination: str) -> tuple[int, int, str | None, str | None]:
    """(failed attempts, delivered, state, last error) of a destination's deliveries."""
    failed = node.query(
        "SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id "
        "WHERE d.destination = ? AND a.ok = 0",
        destination,
    )[0][0]
    rows = node.query("SELECT state, last_error FROM deliveries WHERE destination = ? ORDER BY id", destination)
    delivered = sum(state == "delivered" for state, _ in rows)
    states = ",".join(sorted({state for state, _ in rows})) or None
    return failed, delivered, states, (rows[-1][1] if rows else None)


def test_orthanc_down_and_dead_destinations_never_delay_another(tmp_path, factory, peers):
    require_orthanc()
    pacs = peers(Orthanc(tmp_path / "orthanc")).start()
    results = peers(DcmtkStoreSCP(tmp_path / "results")).start()
    silent = peers(SilentListener())
    setup = write_config(
        tmp_path / "node",
        routes=[CHEST_ROUTE | {"destinations": ["pacs", "closed", "silent", "results"]}],
        destinations={
            "pacs": {"kind": "dicom", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port},
            "closed": {"kind": "dicom", "ae_title": "CLOSED", "host": "127.0.0.1", "port": free_port()},
            "silent": {
                "kind": "dicom", "ae_title": "SILENT", "host": "127.0.0.1", "port": silent.port, "timeout_seconds": 5
            },
            "results": results.destination(),
        },
    )
    node = peers(Node(setup)).start()
    try:
        node.wait_ready()
        [image] = factory.series(tmp_path / "sent", "CR", 1)
        assert [s.status for s in store(setup.port, setup.ae_title, [image])] == [0]
        wait_for(lambda: _job_state(node) == "running", 60, 0.02, "job running")
        pacs.proc.kill()  # a crash, mid-job: the results will find it gone
        pacs.proc.wait()
        down_at = time.monotonic()
        wait_for(lambda: _job_state(node) == "done", 60, 0.02, "job done")
        done_at = time.monotonic()
        wait_for(lambda: len(results.arrivals()) >= 2, 30, 0.02, "SEG and SR at storescp")
        results_s = time.monotonic() - done_at
        wait_for(lambda: _attempts(node, "pacs")[0] >= 3, 60, 0.1, "failed attempts to the stopped Orthanc")
        pacs.start()
        back_at = time.monotonic()
        study = _study_uid(image)

        def in_orthanc() -> list[int]:
            return [len(pacs.series_instances(study, Modality=m)) for m in ("SEG", "SR")]

        wait_for(lambda: in_orthanc() == [1, 1], 60, 0.1, "SEG and SR in Orthanc after it returned")
        delivered_s = time.monotonic() - back_at
        # Orthanc holds both a moment before the node records the second.
        wait_for(lambda: _attempts(node, "pacs")[1] == 2, 30, 0.1, "deliveries to Orthanc recorded")
        pacs_figures, closed, hung = _attempts(node, "pacs"), _attempts(node, "closed"), _attempts(node, "silent")
        alive = node.alive() and node.echo()
    finally:
        t = time.monotonic()
        node.stop()
        stop_s = time.monotonic() - t
        results.stop()
        silent.close()
        pacs.stop()

    figures = report(
        "outage",
        {
            "results_at_storescp_after_job_done_s": round(results_s, 3),
            "orthanc_down_s": round(back_at - down_at, 2),
            "orthanc_failed_attempts_while_down": pacs_figures[0],
            "orthanc_delivered_after_return_s": round(delivered_s, 2),
            "orthanc_deliveries": pacs_figures[2],
            "closed_port": {"failed_attempts": closed[0], "state": closed[2], "last_error": closed[3]},
            "silent_peer": {"failed_attempts": hung[0], "state": hung[2], "last_error": hung[3]},
            "node_alive": alive,
            "node_stop_s": round(stop_s, 2),
        },
    )
    assert results_s < 5, figures
    assert pacs_figures[0] >= 3 and pacs_figures[1] == 2, figures
    # Down is transient: still pending, retried, never given up on.
    assert closed[0] >= 1 and closed[1] == 0 and closed[2] == "pending", figures
    assert hung[1] == 0 and hung[2] == "pending", figures
    assert alive


def _study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


@pytest.mark.parametrize(
    "key, value",
    [("min_free_mb", 1e12), ("min_free_percent", 99.999)],
    ids=["min_free_mb", "min_free_percent"],
)
def test_free_space_guard_answers_a700_and_writes_nothing(tmp_path, factory, peers, key, value):
    setup = write_config(tmp_path / "node", storage={"min_free_mb": 0, "min_free_percent": 0, key: value})
    node = peers(Node(setup)).start()
    paths = factory.series(tmp_path / "sent", "CT", 3)
    try:
        sent = store(setup.port, setup.ae_title, paths)
        alive = node.alive() and node.echo()
        rows = node.query("SELECT count(*) FROM instances")[0][0]
    finally:
        node.stop()
    files = [p for d in setup.folders for p in d.rglob("*") if p.is_file()]
    usage = shutil.disk_usage(setup.spool)
    report(
        f"disk_guard_{key}",
        {
            key: value,
            "free_mb": usage.free // 2**20,
            "free_percent": round(100 * usage.free / usage.total, 1),
            "statuses": [None if s.status is None else f"0x{s.status:04X}" for s in sent],
            "files_written": len(files),
            "index_rows": rows,
            "node_alive": alive,
        },
    )
    assert [s.status for s in sent] == [0xA700] * 3
    assert files == [] and rows == 0 and alive


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs, mounted for the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> int:
    """Write a file until the file system is full; returns its size."""
    written = 0
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 16, 1 << 10, 1):  # then the last bytes
            while True:
                try:
                    written += os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return written


def test_full_tmpfs_a700_then_recovers_by_itself(tmp_path, factory, small_tmpfs, peers):
    # The guard off: the real ENOSPC path, which the guard normally pre-empts.
    setup = write_config(tmp_path / "node", data_dir=small_tmpfs, storage={"min_free_mb": 0, "min_free_percent": 0})
    node = peers(Node(setup)).start()  # stopped before the tmpfs is unmounted
    first = factory.series(tmp_path / "sent" / "a", "CT", 2)
    later = factory.series(tmp_path / "sent" / "b", "CT", 3)
    try:
        before = [s.status for s in store(setup.port, setup.ae_title, first)]
        pid = node.pid
        filler = _fill(small_tmpfs)
        full = [s.status for s in store(setup.port, setup.ae_title, later)]
        alive_full = node.alive() and node.echo()
        spool_full = sorted(p.name for p in setup.spool.rglob("*.dcm"))
        tmp_full = temporary_files(*setup.folders)
        quarantined = list(setup.quarantine.glob("*"))
        (small_tmpfs / "filler").unlink()
        after = [s.status for s in store(setup.port, setup.ae_title, later)]
        rows = dict(node.query("SELECT sop_instance_uid, path FROM instances"))
        same_process = node.pid == pid and node.alive() and node.echo()
        errors = Counter(e.get("event") for e in node.process.log_lines() if e.get("level") in ("error", "warning"))
    finally:
        node.stop()
    identical = sum(p.stem in rows and dataset_bytes(Path(rows[p.stem])) == dataset_bytes(p) for p in first + later)
    figures = report(
        "disk_full_tmpfs",
        {
            "tmpfs_mb": 8,
            "filler_bytes": filler,
            "before_full": [f"0x{s:04X}" for s in before],
            "while_full": [None if s is None else f"0x{s:04X}" for s in full],
            "after_space_returned": [None if s is None else f"0x{s:04X}" for s in after],
            "spool_files_while_full": len(spool_full),
            "temporary_files_while_full": len(tmp_full),
            "quarantined_while_full": len(quarantined),
            "stored_identical_in_the_end": identical,
            "same_process_throughout": same_process,
            "node_log_warnings_and_errors": dict(errors),
        },
    )
    assert before == [0, 0]
    assert full == [0xA700] * 3, figures
    assert alive_full and len(spool_full) == 2 and not tmp_full and not quarantined, figures
    assert after == [0, 0, 0] and identical == 5 and same_process, figures
