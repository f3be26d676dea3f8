"""The Celery application of ``[worker] backend = "celery"``, built from the
configuration for the node (which publishes) and for each ``ainode worker``
(which consumes). No module-level app: each process makes its own.

Every setting below is stated, with why, in docs/architecture.md
("Scaling out"). In short: a message is acknowledged only after its job
ended (``task_acks_late``), one message at a time per worker process
(``worker_prefetch_multiplier = 1``), JSON only (a broker is never trusted
with pickle), a visibility timeout longer than the slowest job, and bounded
retries. Losing a message loses nothing: the job rows are the truth
(:mod:`node.index.queue`).
"""

from __future__ import annotations

from celery import Celery

from node.config import CelerySection, NodeConfig

#: The one task: run the job whose id the message carries.
TASK_NAME = "ainode.run_job"


def celery_settings(section: CelerySection) -> dict:
    """The Celery configuration for ``[worker.celery]`` (Celery 5 setting names)."""
    settings: dict = {
        "broker_url": section.broker_url.get_secret_value(),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,  # the outcome is the job row
        "task_time_limit": section.job_time_limit_seconds,
        "task_create_missing_queues": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a worker waits out a broker outage
        "broker_connection_timeout": section.publish_timeout_seconds,
        "broker_heartbeat": 0,  # the solo pool blocks while a job runs; AMQP heartbeats would time out
        "worker_cancel_long_running_tasks_on_connection_loss": False,  # the job row, not the channel, owns the job
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_enable_remote_control": False,
    }
    if section.is_redis:
        settings["broker_transport_options"] = {
            "visibility_timeout": section.visibility_timeout_seconds,
            "socket_connect_timeout": section.publish_timeout_seconds,
            "socket_timeout": max(section.publish_timeout_seconds, 30.0),
        }
    if section.tls is not None:
        settings["broker_use_ssl"] = section.tls.kombu_options(section.is_redis)
    return settings


def make_celery_app(config: NodeConfig) -> Celery:
    """A Celery app for this configuration; ``set_as_current=False`` keeps it
    out of Celery's process-wide default."""
    app = Celery("ainode", set_as_current=False)
    app.conf.update(celery_settings(config.worker.celery))
    return app
