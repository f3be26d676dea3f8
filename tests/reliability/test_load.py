"""Load: eight parallel senders, CT, MR and CR series, into ``ainode serve``.

Half the senders are dcmtk ``storescu`` (TCP_NODELAY=1), half pynetdicom
SCUs streaming the files byte for byte. Every instance sent must be
acknowledged (0x0000), in the spool, in the index, and byte-identical: the
spooled file's dataset (after its file meta, which the receiver writes itself
from the request, PS3.10 7.1) is the dataset that was sent.
"""

from __future__ import annotations

import itertools
import math
import threading
import time

import pytest

from tests.reliability.sizes import LOAD_INSTANCES, LOAD_SENDERS, LOAD_SERIES
from tests.reliability.support import (
    Node,
    Sent,
    Tally,
    dataset_bytes,
    percentile,
    report,
    store,
    storescu_verbose,
    temporary_files,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_parallel_senders_every_instance_acknowledged_spooled_indexed_identical(tmp_path, factory, peers):
    per_series = math.ceil(LOAD_INSTANCES / LOAD_SERIES)
    t = time.perf_counter()
    series = [
        factory.series(tmp_path / "sent" / f"{i:03d}", modality, per_series, chest=False)
        for i, modality in zip(range(LOAD_SERIES), itertools.cycle(["CT", "MR", "CR"]))
    ]
    generate_s = time.perf_counter() - t
    sent = [p for s in series for p in s]

    setup = write_config(tmp_path / "node")
    node = peers(Node(setup)).start()
    tally = Tally()
    storescu_series: list[list] = []
    errors: list[BaseException] = []

    def sender(k: int) -> None:
        try:
            for paths in series[k::LOAD_SENDERS]:
                if k % 2 == 0:
                    outcome = storescu_verbose(paths, setup.port, setup.ae_title, calling=f"STORESCU{k}")
                    storescu_series.append(outcome)
                    for path, ok in outcome:
                        with tally.lock:
                            if ok:
                                tally.acknowledged[path.stem] = path
                            else:
                                tally.refused.append((path, -1))
                else:
                    results = store(setup.port, setup.ae_title, paths, calling=f"PYNETDICOM{k}")
                    for r in results:
                        tally.add(r)
                    for p in paths[len(results) :]:
                        tally.add(Sent(p, None, 0.0))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(LOAD_SENDERS)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    wall = time.perf_counter() - t
    assert not errors, errors
    alive_after = node.alive() and node.echo()

    rows = {uid: (path, size) for uid, path, size in node.query("SELECT sop_instance_uid, path, size FROM instances")}
    node.stop()

    spooled = identical = 0
    mismatched = []
    for p in sent:
        row = rows.get(p.stem)
        if row is None:
            continue
        spool_path = setup.spool / f"{_study_series(p)}" / f"{p.stem}.dcm"
        if not spool_path.is_file() or str(spool_path) != row[0]:
            continue
        spooled += 1
        if dataset_bytes(spool_path) == dataset_bytes(p):
            identical += 1
        else:
            mismatched.append(p.name)

    figures = report(
        "load",
        {
            "senders": LOAD_SENDERS,
            "series": len(series),
            "instances_sent": len(sent),
            "acknowledged": len(tally.acknowledged),
            "in_spool": spooled,
            "in_index": sum(p.stem in rows for p in sent),
            "byte_identical": identical,
            "refused": len(tally.refused),
            "lost_responses": tally.lost,
            "wall_s": round(wall, 2),
            "throughput_instances_per_s": round(len(sent) / wall, 1),
            "pynetdicom_c_store_s": {
                "count": len(tally.seconds),
                "p50": round(percentile(tally.seconds, 50), 4),
                "p99": round(percentile(tally.seconds, 99), 4),
                "worst": round(max(tally.seconds, default=0.0), 4),
            },
            "generate_s": round(generate_s, 2),
            "node_alive_after": alive_after,
            "temporary_files_left": len(temporary_files(*setup.folders)),
        },
    )
    n = len(sent)
    assert (figures["acknowledged"], figures["in_spool"], figures["in_index"], identical) == (n, n, n, n), (
        figures,
        mismatched[:5],
    )
    assert alive_after and figures["temporary_files_left"] == 0


def _study_series(path) -> str:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
    return f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}"
