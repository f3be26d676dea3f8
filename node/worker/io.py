"""A Celery worker's input and output over HTTP, to and from the node
(``[worker] input = "dicomweb"``, ``output = "stow"``), with dicomweb-client.

- :class:`DicomwebSource` fetches a job's series by WADO-RS (PS3.18 10.4.1,
  Retrieve Transaction, series resource) from ``<node_url>/dicom-web``,
  asking for ``transfer-syntax=*``: the node answers with the bytes it
  stored, compressed or not (an Accept naming no transfer syntax would mean
  Explicit VR Little Endian, PS3.18 8.7.3.5.2).
- :class:`StowSink` hands the results back by STOW-RS (PS3.18 10.5) to the
  node's endpoint for that job, ``<node_url>/api/jobs/<id>/results/studies``
  (:mod:`node.api.routers.job_results`), which writes them to the node's
  outbox and marks the job done exactly as an in-process job is.

Both send the worker's bearer token (``[worker] node_token``, scopes read
and ingest) and check an HTTPS node against ``node_ca_file``. A node that
cannot be reached, or answers 5xx, raises
:class:`~node.run.TransientJobError` (the task retries, bounded); a 409
from the results endpoint means the job is no longer this worker's
(:class:`node.index.ClaimLost`).
"""

from __future__ import annotations

import json

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from node.config import NodeConfig
from node.index import ClaimLost, JobView
from node.run import TransientJobError, input_series
from pipelines.base import PipelineInputError, Study

#: Request timeout (connect, read) in seconds.
TIMEOUT = (5.0, 300.0)


def _client(config: NodeConfig, extra_headers: dict[str, str] | None = None, *, wado: str | None = None,
            stow: str | None = None) -> DICOMwebClient:
    w = config.worker
    session = requests.Session()
    if w.node_ca_file is not None:
        session.verify = str(w.node_ca_file)
    headers = {"Authorization": f"Bearer {w.node_token.get_secret_value()}"} if w.node_token else {}
    return DICOMwebClient(f"{w.node_url}", session=session, headers=headers | (extra_headers or {}), timeout=TIMEOUT,
                          wado_url_prefix=wado, stow_url_prefix=stow)


def _transient(exc: requests.RequestException) -> bool:
    response = getattr(exc, "response", None)
    return response is None or response.status_code >= 500 or response.status_code == 429


class DicomwebSource:
    """A job's input series over WADO-RS from the node.

    Raises
    ------
    PipelineInputError
        The node does not hold the series (404) or refuses it (4xx).
    TransientJobError
        The node cannot be reached or answers 5xx.
    """

    def __init__(self, config: NodeConfig):
        self.client = _client(config, wado="dicom-web")

    def load(self, job: JobView) -> Study:
        series: dict[str, list[Dataset]] = {}
        for uid in input_series(job):
            try:
                series[uid] = self.client.retrieve_series(
                    job.study_uid, uid, media_types=(("application/dicom", "*"),)
                )
            except requests.RequestException as exc:
                if _transient(exc):
                    raise TransientJobError(f"WADO-RS of series {uid} from the node failed: {exc}") from exc
                raise PipelineInputError(f"the node refused WADO-RS of series {uid}: {exc}") from exc
            if not series[uid]:
                raise PipelineInputError(f"the node holds no instance of series {uid}")
        return Study(study_instance_uid=job.study_uid, series=series, roles=dict(job.roles))


class StowSink:
    """Results back to the node by STOW-RS, for the job they belong to; the
    node writes them to its outbox and marks the job done (one transaction).

    Headers: ``X-Ainode-Worker`` (the claim is checked), ``X-Ainode-Timings``
    (JSON, stage -> seconds) and ``X-Ainode-Note`` (JSON: the intended-use
    warnings of the ``done`` transition).
    """

    def __init__(self, config: NodeConfig):
        self.config = config

    def deliver(self, job: JobView, results: list, timings: dict[str, float], note: str | None, worker_id: str | None) -> int:
        headers = {"X-Ainode-Worker": worker_id or "", "X-Ainode-Timings": json.dumps(timings), "X-Ainode-Note": json.dumps(note)}
        client = _client(self.config, headers, stow=f"api/jobs/{job.id}/results")
        try:
            answer = client.store_instances(results)
        except requests.RequestException as exc:
            response = getattr(exc, "response", None)
            if response is not None and response.status_code == 409:
                raise ClaimLost(response.text[:300]) from exc
            if _transient(exc):
                raise TransientJobError(f"STOW-RS of job {job.id}'s results to the node failed: {exc}") from exc
            raise RuntimeError(f"the node refused job {job.id}'s results: {exc}") from exc
        return len(answer.get("ReferencedSOPSequence", [])) if answer is not None else len(results)
