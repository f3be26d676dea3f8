"""Hostile input: generated bad datasets, sent raw to ``ainode serve``.

Categories and the answers expected of each: tests/reliability/hostile.py.
For every category: the node process stays up and answers C-ECHO; every
refusal has its quarantined bytes and a ``.json`` with the reason and the
status answered; what is stored is in the spool byte for byte and in the
index, its over-long values clipped; nothing is written outside the node's
own folders (the node runs with its working directory in the test's folder,
and traversal UIDs aim at it and at /tmp).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.reliability import hostile
from tests.reliability.sizes import HOSTILE_INPUTS
from tests.reliability.support import Node, Sent, dataset_bytes, report, store, temporary_files, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

#: Index columns and the maximum length of the attribute they hold (PS3.5 6.2).
CLIPPED = {
    ("series", "modality"): 16,
    ("series", "series_description"): 64,
    ("studies", "patient_id"): 64,
    ("studies", "accession_number"): 16,
}


def _code(sent: Sent) -> str:
    return "none" if sent.status is None else f"0x{sent.status:04X}"


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _send_all(node: Node, paths: list[Path]) -> list[Sent]:
    """Send on one association, opening another after any lost response."""
    out: list[Sent] = []
    while len(out) < len(paths):
        todo = paths[len(out) :]
        try:
            sent = store(node.setup.port, node.setup.ae_title, todo, calling="HOSTILE", timeout=60)
        except ConnectionError:
            sent = [Sent(todo[0], None, 0.0)]
        out += sent
    return out


def test_bad_inputs_are_refused_quarantined_or_stored_and_the_node_survives(tmp_path, peers):
    token = uuid.uuid4().hex[:12]
    cases = hostile.generate(HOSTILE_INPUTS, token)
    files: dict[str, list[Path]] = {}
    for category, items in cases.items():
        d = tmp_path / "inputs" / category
        d.mkdir(parents=True)
        files[category] = [c.write(d / f"{i:03d}.dcm") for i, c in enumerate(items)]

    setup = write_config(tmp_path / "node")
    node = peers(Node(setup)).start()
    node_files = {setup.config_path, node.process.log_path}
    passwd = Path("/etc/passwd").stat()
    before = _tree(tmp_path)
    pid = node.pid

    per_category = {}
    answered: list[tuple[hostile.Case, Sent]] = []
    t0 = time.perf_counter()
    for category, items in cases.items():
        sent = _send_all(node, files[category])
        answered += zip(items, sent, strict=True)
        alive = node.alive() and node.pid == pid and node.echo()
        per_category[category] = {
            "inputs": len(items),
            "statuses": dict(Counter(_code(s) for s in sent)),
            "unexpected": [
                (c.name, _code(s))
                for c, s in zip(items, sent, strict=True)
                if s.status not in c.expect
            ],
            "alive_and_echo_after": alive,
            "by_input": {
                name: sorted({_code(s) for c, s in zip(items, sent, strict=True) if c.name == name})
                for name in dict.fromkeys(c.name for c in items)
            },
        }
    wall = time.perf_counter() - t0
    rows = {
        uid: path
        for uid, path in node.query("SELECT sop_instance_uid, path FROM instances")
    }
    clipped_lengths = {
        (table, col): node.query(f"SELECT max(length({col})) FROM {table}")[0][0] or 0 for table, col in CLIPPED
    }
    node.stop()

    # Refusals: each with its bytes and a .json naming reason and status.
    notes = [json.loads(p.read_text()) | {"_path": p} for p in sorted(setup.quarantine.glob("*.json"))]
    by_request: dict[str, list[dict]] = {}
    for note in notes:
        by_request.setdefault(str(note.get("affected_sop_instance_uid")), []).append(note)
    refused = [(c, s) for c, s in answered if s.status not in (0, None)]
    unexplained = []
    for case, sent in refused:
        match = [
            n
            for n in by_request.get(case.request_uid, [])
            if str(n.get("dimse_status", "")).upper() == f"0X{sent.status:04X}" and n.get("reason")
        ]
        data = [p for n in match for p in n["_path"].parent.glob(n["_path"].stem + ".*") if p.suffix != ".json"]
        if not match or not data:
            unexplained.append((case.category, case.name))
    for category in per_category:
        per_category[category]["quarantined"] = sum(
            1 for c, s in refused if c.category == category and (c.category, c.name) not in unexplained
        )

    # Stored: in the spool as sent, in the index.
    stored = [(c, s) for c, s in answered if s.status == 0]
    not_kept = [
        c.name
        for c, _ in stored
        if c.request_uid not in rows or dataset_bytes(Path(rows[c.request_uid])) != c.body
    ]

    # Nothing outside the node's folders, in the test's folder or beyond.
    own = [setup.spool, setup.quarantine, setup.outbox]
    new = sorted(_tree(tmp_path) - before)
    outside = [
        n
        for n in new
        if not any((tmp_path / n).is_relative_to(d) for d in own)
        and not (tmp_path / n).name.startswith(setup.index_db.name)
        and tmp_path / n not in node_files
    ]
    escaped = sorted(str(p) for p in Path("/tmp").glob(hostile.escape_token(token) + "*"))
    spool_names_not_uids = [
        str(p.relative_to(setup.spool))
        for p in setup.spool.rglob("*")
        if not all(part.replace(".", "").isdigit() for part in p.relative_to(setup.spool).with_suffix("").parts)
    ]
    passwd_after = Path("/etc/passwd").stat()

    figures = report(
        "hostile_input",
        {
            "inputs": len(answered),
            "crashes": sum(not v["alive_and_echo_after"] for v in per_category.values()),
            "refused": len(refused),
            "refused_without_quarantine_note": len(unexplained),
            "quarantine_notes": len(notes),
            "stored": len(stored),
            "stored_not_in_spool_or_index_as_sent": len(not_kept),
            "answered_0xA700": sum(s.status == 0xA700 for _, s in answered),
            "no_response": sum(s.status is None for _, s in answered),
            "files_outside_node_folders": len(outside) + len(escaped),
            "spool_names_not_uids": len(spool_names_not_uids),
            "index_max_lengths": {f"{t}.{c}": n for (t, c), n in clipped_lengths.items()},
            "temporary_files_left": len(temporary_files(*own)),
            "wall_s": round(wall, 2),
            "per_category": per_category,
        },
    )
    assert figures["crashes"] == 0, per_category
    assert figures["no_response"] == 0 and figures["answered_0xA700"] == 0
    unexpected = {k: v["unexpected"] for k, v in per_category.items() if v["unexpected"]}
    assert not unexpected, unexpected
    assert not unexplained, unexplained[:10]
    assert len(notes) == len(refused), "one quarantine note per refusal, no more"
    assert not not_kept, not_kept[:10]
    assert not outside and not escaped and not spool_names_not_uids, (outside[:10], escaped, spool_names_not_uids[:10])
    assert (passwd_after.st_mtime_ns, passwd_after.st_size) == (passwd.st_mtime_ns, passwd.st_size)
    assert all(n <= CLIPPED[key] for key, n in clipped_lengths.items()), clipped_lengths
    assert figures["temporary_files_left"] == 0
