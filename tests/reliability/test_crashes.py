"""Crashes: SIGKILL/restart cycles of ``ainode serve`` during load, during a
running job and during dispatch.

Senders keep sending CT/MR series (not routed) and chest radiographs (routed
to the pneumonia pipeline), and re-send whatever was not acknowledged when the
node died. Results go to dcmtk ``storescp +uf``, which keeps every arrival as
its own file, slowed during the cycles (``--sleep-during 1``) so that kills
land mid-delivery.

After the cycles:

- every acknowledged instance is in the spool (byte-identical) and indexed;
- no temporary file a kill left behind survives the next start-up's recovery,
  and none is left at the end;
- every chest series ends with exactly one ``done`` job and no other job;
- each source image has exactly one SEG and one SR SOP Instance UID at the
  destination (the same object re-sent after a crash is allowed and
  counted; two UIDs for the same source, pipeline and model are duplicates).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.peers import wait_for
from tests.reliability.sizes import (
    CRASH_CR_SERIES,
    CRASH_LOAD_SERIES,
    CRASH_SERIES_SIZE,
    KILL_CYCLES,
)
from tests.reliability.support import (
    CHEST_ROUTE,
    DcmtkStoreSCP,
    Node,
    Tally,
    dataset_bytes,
    duplicates,
    report,
    store,
    temporary_files,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PHASES = ("load", "job", "dispatch")


@dataclass
class ResilientSender:
    """Sends the series put on its queue, one association each, until it
    gets None; whatever was not acknowledged when the node died is sent again
    (from the first unacknowledged file) once the node answers."""

    port: int
    ae_title: str
    tally: Tally
    calling: str
    work: queue.Queue = field(default_factory=queue.Queue)
    in_association: bool = False
    retries: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            while (paths := self.work.get()) is not None:
                self._send(list(paths))
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def _send(self, todo: list[Path]) -> None:
        while todo:
            try:
                self.in_association = True
                results = store(self.port, self.ae_title, todo, calling=self.calling, timeout=20)
            except ConnectionError:  # the node is down: wait for it
                self.retries += 1
                time.sleep(0.2)
                continue
            finally:
                self.in_association = False
            for r in results:
                self.tally.add(r)
            refused = [r for r in results if r.status not in (0, None)]
            assert not refused, f"refused: {[(r.path.name, hex(r.status)) for r in refused]}"
            todo = todo[sum(r.status == 0 for r in results) :]
            if todo:
                self.retries += 1
                time.sleep(0.2)


def _running_jobs(node: Node) -> int:
    return node.query("SELECT count(*) FROM jobs WHERE state = 'running'")[0][0]


def _pending_deliveries(node: Node) -> int:
    return node.query("SELECT count(*) FROM deliveries WHERE state = 'pending'")[0][0]


def _until(predicate, timeout: float) -> bool:
    try:
        wait_for(predicate, timeout, 0.05)
        return True
    except TimeoutError:
        return False


def test_sigkill_cycles_lose_nothing_and_duplicate_nothing(tmp_path, factory, peers):
    results = peers(DcmtkStoreSCP(tmp_path / "results", sleep_during=1)).start()
    setup = write_config(
        tmp_path / "node",
        routes=[CHEST_ROUTE | {"destinations": ["results"]}],
        destinations={"results": results.destination(timeout_seconds=10)},
        completion={"series_idle_seconds": 2},
        # We kill on purpose, more often than any real node dies: a job killed
        # max_job_attempts times would be failed, by design.
        worker={"max_job_attempts": KILL_CYCLES + 5},
    )
    load = [
        factory.series(tmp_path / "sent" / f"l{i:03d}", ("CT", "MR")[i % 2], CRASH_SERIES_SIZE)
        for i in range(CRASH_LOAD_SERIES)
    ]
    chest = [factory.series(tmp_path / "sent" / f"c{i:03d}", "CR", 1) for i in range(CRASH_CR_SERIES)]

    tally = Tally()
    loaders = [ResilientSender(setup.port, setup.ae_title, tally, f"LOAD{k}") for k in range(3)]
    radiographs = ResilientSender(setup.port, setup.ae_title, tally, "CHEST")
    senders = [*loaders, radiographs]
    node = peers(Node(setup)).start()
    started = time.monotonic()
    for s in senders:
        threading.Thread(target=s.run, daemon=True).start()

    # Each cycle gives the senders new work, so that every kill has something
    # to interrupt: load series in every cycle, a chest radiograph (a job, then
    # its deliveries) in the job and dispatch cycles.
    pending_load, pending_chest = list(load), list(chest)
    per_cycle = max(1, len(load) // KILL_CYCLES)
    rng = random.Random(1)
    cycles = []
    left_by_kills: list[Path] = []
    survived: list[Path] = []
    for cycle in range(KILL_CYCLES):
        phase = PHASES[cycle % len(PHASES)]
        for k in range(per_cycle):
            if pending_load:
                loaders[k % len(loaders)].work.put(pending_load.pop())
        if phase != "load" and pending_chest:
            radiographs.work.put(pending_chest.pop())
        if phase == "load":
            time.sleep(rng.uniform(0.3, 1.2))
            hit = any(s.in_association for s in senders)
        elif phase == "job":
            hit = _until(lambda: _running_jobs(node) > 0, 20)
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            hit = _until(lambda: _pending_deliveries(node) > 0, 25)
            time.sleep(rng.uniform(0.1, 0.9))
        state = {
            "cycle": cycle,
            "phase": phase,
            "hit": hit,
            "senders_in_association": sum(s.in_association for s in senders),
            "jobs_running": _running_jobs(node),
            "deliveries_pending": _pending_deliveries(node),
        }
        node.kill()
        left = temporary_files(*setup.folders)
        state["temporary_files_left_by_kill"] = len(left)
        left_by_kills += left
        if cycle == KILL_CYCLES - 1:
            results.restart(sleep_during=0)  # the rest at full speed
        node.start()
        survived += [p for p in left if p.exists()]
        recovered = node.log_events("recovered")[-1]
        state["recovered"] = {k: v for k, v in recovered.items() if k not in ("event", "timestamp", "level", "logger")}
        cycles.append(state)
    cycles_s = time.monotonic() - started

    for k, paths in enumerate(pending_load):
        loaders[k % len(loaders)].work.put(paths)
    for paths in pending_chest:
        radiographs.work.put(paths)
    for s in senders:
        s.work.put(None)
    for s in senders:
        assert s.done.wait(300), f"{s.calling} did not finish"
        assert s.error is None, f"{s.calling}: {s.error!r}"
    chest_series = {_series_uid(p[0]) for p in chest}

    def settled() -> bool:
        rows = node.query("SELECT series_uid, state FROM jobs")
        done = {uid for uid, st in rows if st == "done"}
        return chest_series <= done and _pending_deliveries(node) == 0 and _running_jobs(node) == 0

    wait_for(settled, 240, 0.5, "every chest series done and delivered")
    time.sleep(1.5)  # a duplicate in flight would arrive by now
    node.stop()
    results.stop()
    leftover = temporary_files(*setup.folders)

    # Every acknowledged instance: in the index, in the spool, byte-identical.
    rows = dict(node.query("SELECT sop_instance_uid, path FROM instances"))
    missing = [uid for uid in tally.acknowledged if uid not in rows]
    not_identical = [
        uid
        for uid, sent in tally.acknowledged.items()
        if uid in rows and (not Path(rows[uid]).is_file() or dataset_bytes(Path(rows[uid])) != dataset_bytes(sent))
    ]
    all_sent = {p.stem for s in load + chest for p in s}

    jobs = node.query("SELECT series_uid, state, attempts FROM jobs")
    unrouted_jobs = [j for j in jobs if j[0] not in chest_series]
    per_series = {uid: [st for s_uid, st, _ in jobs if s_uid == uid] for uid in chest_series}
    arrivals = results.arrivals()
    groups, resent = duplicates(arrivals)
    duplicate_uids = sum(len(uids) - 1 for uids in groups.values())
    chest_sources = {p[0].stem for p in chest}
    covered = {(src, mod) for (src, mod, _), _ in groups.items()}

    figures = report(
        "crashes",
        {
            "kill_cycles": len(cycles),
            "kills_by_phase": {ph: sum(c["phase"] == ph for c in cycles) for ph in PHASES},
            "kills_that_hit_their_phase": {ph: sum(c["phase"] == ph and c["hit"] for c in cycles) for ph in PHASES},
            "instances_sent": len(all_sent),
            "acknowledged": len(tally.acknowledged),
            "lost_responses_resent": tally.lost,
            "acknowledged_missing_from_index": len(missing),
            "acknowledged_not_identical_in_spool": len(not_identical),
            "temporary_files_left_by_kills": len(left_by_kills),
            "temporary_files_surviving_recovery": len(survived),
            "temporary_files_at_end": len(leftover),
            "chest_series": len(chest_series),
            "chest_series_with_exactly_one_done_job": sum(v == ["done"] for v in per_series.values()),
            "job_attempts_max": max((a for _, _, a in jobs), default=0),
            "jobs_for_unrouted_series": len(unrouted_jobs),
            "result_arrivals": len([a for a in arrivals if a.sop_instance_uid]),
            "unreadable_arrivals": len([a for a in arrivals if a.sop_instance_uid is None]),
            "result_resends_same_uid": resent,
            "duplicate_result_uids": duplicate_uids,
            "cycles_wall_s": round(cycles_s, 1),
            "node_starts": node.starts,
            "cycles": cycles,
        },
    )
    hits = figures["kills_that_hit_their_phase"]
    assert all(hits[ph] >= 1 for ph in PHASES if figures["kills_by_phase"][ph]), hits
    assert len(tally.acknowledged) == len(all_sent), "every instance is acknowledged in the end"
    assert not missing and not not_identical, (missing[:5], not_identical[:5])
    assert not survived, f"temporary files survived recovery: {survived[:5]}"
    assert not leftover, f"temporary files left: {leftover[:5]}"
    assert figures["chest_series_with_exactly_one_done_job"] == len(chest_series), per_series
    assert not unrouted_jobs, unrouted_jobs[:5]
    assert covered == {(src, mod) for src in chest_sources for mod in ("SEG", "SR")}, sorted(covered)
    assert duplicate_uids == 0, {k: v for k, v in groups.items() if len(v) > 1}
    assert figures["unreadable_arrivals"] == 0


def _series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
