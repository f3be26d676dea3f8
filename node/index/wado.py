"""What WADO-RS serves (node/api/routers/wado.py): the instances the spool
holds for a study, a series or one instance, with their stored transfer
syntax, read from the ``instances`` rows (no file is opened here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from node.index.core import IndexCore
from node.index.schema import Instance


@dataclass(frozen=True)
class StoredInstance:
    """One received instance as the spool keeps it (byte for byte)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str  # of the stored file (its file meta)
    path: Path
    size: int  # bytes of the stored file


class WadoQueries(IndexCore):
    """The instances of a study, series or instance, for WADO-RS."""

    def stored_instances(
        self, study_uid: str, series_uid: str | None = None, sop_instance_uid: str | None = None
    ) -> list[StoredInstance]:
        """Instances of ``study_uid`` (and of ``series_uid``, and that one
        ``sop_instance_uid``, where given), by series UID then Instance Number
        (absent ones last) then SOP Instance UID; empty for an unknown or
        purged study, or a series of another study."""
        q = select(Instance).where(Instance.study_uid == study_uid)
        if series_uid is not None:
            q = q.where(Instance.series_uid == series_uid)
        if sop_instance_uid is not None:
            q = q.where(Instance.sop_instance_uid == sop_instance_uid)
        with self._session() as s:
            rows = [
                (
                    r.instance_number,
                    StoredInstance(
                        r.study_uid, r.series_uid, r.sop_instance_uid, r.sop_class_uid, r.transfer_syntax_uid,
                        Path(r.path), r.size,
                    ),
                )
                for r in s.scalars(q)
            ]
        rows.sort(key=lambda r: (r[1].series_uid, r[0] is None, r[0] or 0, r[1].sop_instance_uid))
        return [r[1] for r in rows]
