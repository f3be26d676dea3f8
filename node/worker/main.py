"""``ainode worker``: a Celery worker process that runs the node's jobs.

One process runs one job at a time on Celery's ``solo`` pool: its models
stay loaded in the process that runs them (a ``prefork`` child would load
its own copy, and a CUDA context does not survive a fork), so a machine
runs one process per GPU, and CPU machines scale by process count
(``ainode-worker@N`` units, deploy/systemd). SIGTERM is Celery's warm
shutdown: the current job finishes, then the process exits; SIGQUIT is a
cold shutdown, and the interrupted job is given back
(:class:`~node.worker.runtime.WorkerQueue`); after a SIGKILL the node's
stale sweep takes it back.
"""

from __future__ import annotations

import signal
import socket

from celery import Celery, Task
from celery.signals import worker_ready

from node.config import NodeConfig
from node.queue.celery_app import TASK_NAME, make_celery_app
from node.run import IndexUnavailable, TransientJobError
from node.worker.runtime import WorkerRuntime

#: Retries of a claim while the index is down: about a day at 60 s. Past
#: that the message is dropped and the node publishes the job again after
#: the visibility timeout.
CLAIM_RETRIES = 1440


def register_task(app: Celery, runtime: WorkerRuntime) -> Task:
    """The ``ainode.run_job`` task of ``app``, bound to ``runtime``.

    A transient failure (index or node unreachable) gives the job back and
    retries the message after ``retry_backoff_seconds``, doubling, at most
    ``max_retries`` times; then the job stays queued for the node to publish
    again (at once, to any worker): being unreachable never fails a job. A
    claim that failed (the index down, nothing held) is retried while the
    index is down, at most every 60 s, for about a day (:data:`CLAIM_RETRIES`).
    """
    section = runtime.config.worker.celery

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=section.max_retries,
              ignore_result=True)
    def run_job(task: Task, job_id: int) -> None:
        try:
            runtime.handle(int(job_id))
        except IndexUnavailable as exc:  # nothing claimed: without the index nobody can run it, so wait for it
            retries = task.request.retries or 0
            countdown = min(60.0, section.retry_backoff_seconds * 2**retries)
            raise task.retry(exc=exc, countdown=countdown, max_retries=CLAIM_RETRIES) from exc
        except TransientJobError as exc:
            retries = task.request.retries or 0
            if retries >= section.max_retries:
                runtime.release(int(job_id), f"retries exhausted: {exc}")
                return
            countdown = min(60.0, section.retry_backoff_seconds * 2**retries)
            # Held past the retry's countdown: if that message is lost, the node publishes it again.
            runtime.release(int(job_id), str(exc), hold_seconds=countdown + runtime.config.worker.stale_after_seconds)
            raise task.retry(exc=exc, countdown=countdown) from exc

    return run_job


def mark_cold_shutdown(runtime: WorkerRuntime) -> None:
    """Wrap Celery's SIGQUIT (cold shutdown) handler so the runtime knows
    before Celery interrupts the running job: Celery cancels it before it
    sends ``worker_shutting_down``, so that signal comes too late."""
    celery_handler = signal.getsignal(signal.SIGQUIT)

    def handler(signum, frame) -> None:
        runtime.queue.cold_shutdown = True
        if callable(celery_handler):
            celery_handler(signum, frame)

    try:
        signal.signal(signal.SIGQUIT, handler)
    except ValueError:  # not the main thread: leave Celery's handler alone
        runtime.log.warning("cold_shutdown_unwatched")


def serve_metrics(runtime: WorkerRuntime) -> None:
    """This worker's ``/metrics`` (prometheus_client's server, its own registry)."""
    from prometheus_client import start_http_server

    w = runtime.config.worker
    server, _ = start_http_server(w.metrics_port, addr=w.metrics_bind, registry=runtime.metrics.registry)
    host = socket.getfqdn() if w.metrics_bind in ("0.0.0.0", "::") else w.metrics_bind  # an address others can scrape
    runtime.metrics_url = f"http://{host}:{server.server_port}/metrics"


def run_worker(config: NodeConfig, pipelines: list[str], queues: list[str], *, loglevel: str = "INFO") -> None:
    """Load, announce, consume ``queues`` until shut down, then give back."""
    runtime = WorkerRuntime(config, pipelines, queues)
    serve_metrics(runtime)
    runtime.start()
    if not runtime.queues:
        runtime.close()
        raise SystemExit("no pipeline loaded: nothing to serve")
    app = make_celery_app(config)
    register_task(app, runtime)

    worker_ready.connect(lambda **_: mark_cold_shutdown(runtime), weak=False)
    argv = [
        "worker", "--pool=solo", "--concurrency=1", f"--queues={','.join(runtime.queues)}",
        f"--hostname=ainode-{runtime.worker_id.replace(':', '-')}@%h", "--without-gossip", "--without-mingle",
        "--without-heartbeat", f"--loglevel={loglevel}", "-O", "fair",
    ]
    try:
        app.worker_main(argv)
    finally:
        runtime.close()
