"""Values the index hands out or takes in, detached from any session."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.index.schema import Job


@dataclass(frozen=True)
class InstanceRecord:
    """What the receive step learned of an instance, to index it."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    path: Path
    size: int
    instance_number: int | None = None
    modality: str | None = None
    series_description: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    patient_name: str | None = None  # kept for [api] show_patient_names
    study_date: str | None = None
    calling_ae: str | None = None
    peer_address: str | None = None
    association_id: str | None = None
    clipped: bool = False
    source: str | None = None  # node.ingest.Source; None counts as C-STORE

    @classmethod
    def from_values(
        cls, values: dict[str, Any], transfer_syntax_uid: str, path: Path, size: int, *, clipped: bool = False, **peer
    ) -> InstanceRecord:
        """Build a record from :func:`node.ingest.index_values` (or an
        :class:`node.ingest.Accepted`'s values). An Instance Number
        (0020,0013) that is not an integer is only a sort key, so it is
        recorded as absent rather than refused."""
        try:
            number: int | None = int(values["InstanceNumber"])
        except (KeyError, TypeError, ValueError):
            number = None
        return cls(
            sop_instance_uid=str(values["SOPInstanceUID"]),
            sop_class_uid=str(values["SOPClassUID"]),
            series_uid=str(values["SeriesInstanceUID"]),
            study_uid=str(values["StudyInstanceUID"]),
            transfer_syntax_uid=str(transfer_syntax_uid),
            path=path,
            size=size,
            instance_number=number,
            modality=values.get("Modality"),
            series_description=values.get("SeriesDescription"),
            patient_id=values.get("PatientID"),
            accession_number=values.get("AccessionNumber"),
            patient_name=values.get("PatientName"),
            study_date=values.get("StudyDate"),
            clipped=clipped,
            **peer,
        )

    @classmethod
    def from_header(cls, header, path: Path, size: int, **peer) -> InstanceRecord:
        """Build a record from a parsed header (:func:`node.spool.read_header`),
        text clipped to its VR's maximum length as :func:`from_values` expects."""
        from node.ingest import index_values  # node.ingest imports node.spool, not the index

        values, clipped = index_values(header)
        return cls.from_values(
            values, header.file_meta.TransferSyntaxUID, path, size, clipped=bool(clipped), **peer
        )


@dataclass(frozen=True)
class JobView:
    """A job as the runner needs it, detached from any session."""

    id: int
    pipeline: str
    route: str
    level: str
    study_uid: str
    series_uid: str | None
    destinations: tuple[str, ...]
    attempts: int
    roles: dict[str, str] = field(default_factory=dict)
    #: When the last instance of its input was received (naive UTC).
    trigger_received_at: dt.datetime | None = None
    #: The worker that claimed it (node.queue), and when it was last published to a queue.
    worker_id: str | None = None
    enqueued_at: dt.datetime | None = None


@dataclass(frozen=True)
class DeliveryView:
    id: int
    job_id: int
    sop_instance_uid: str
    destination: str
    path: str
    attempts: int


def _job_view(job: Job) -> JobView:
    return JobView(
        id=job.id,
        pipeline=job.pipeline,
        route=job.route,
        level=job.level,
        study_uid=job.study_uid,
        series_uid=job.series_uid,
        destinations=tuple(filter(None, job.destinations.split(","))),
        attempts=job.attempts,
        roles=json.loads(job.roles) if job.roles else {},
        trigger_received_at=job.trigger_received_at,
        worker_id=job.worker_id,
        enqueued_at=job.enqueued_at,
    )
