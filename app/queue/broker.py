"""Sends job ids to the broker by task name; the API never imports the worker."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from app.core.config import Settings, get_settings
from app.jobs.states import DEFAULT_PRIORITY, MAX_PRIORITY
from app.queue import broker_files

RUN_JOB_TASK = "squeeze.run_job"


def celery_config(settings: Settings) -> dict:
    """Broker settings shared by the API (sender) and the worker (consumer)."""
    conf: dict = {
        "broker_url": settings.broker_url,
        "task_default_queue": settings.queue_default,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
    }
    if settings.broker_url.startswith("filesystem://"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport"] = broker_files.TRANSPORT  # kombu's, without its half-written-message crash
        conf["broker_transport_options"] = {
            # Measured (bench/RESULTS.md): in and out must be the same folder for the filesystem transport.
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),  # kombu's default is ./control in the cwd
            "store_processed": False,
            "polling_interval": 0.1,
        }
    else:
        # One Redis list per priority level (kombu's default groups 0-9 into four), taken highest first.
        conf["broker_transport_options"] = {"visibility_timeout": 3600,
                                            "priority_steps": list(range(MAX_PRIORITY + 1)),
                                            "queue_order_strategy": "priority"}
    return conf


def broker_priority(priority: int) -> int:
    """Squeeze's priority (9 = most urgent) on the broker's scale: kombu's Redis transport takes 0 first."""
    return MAX_PRIORITY - priority


@lru_cache
def _sender() -> Celery:
    app = Celery("squeeze-api")
    app.conf.update(celery_config(get_settings()))
    return app


def enqueue(job_id: str, queue: str, priority: int = DEFAULT_PRIORITY) -> None:
    _sender().send_task(RUN_JOB_TASK, args=[job_id], queue=queue, priority=broker_priority(priority), retry=True,
                        retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2})


def broker_ok() -> bool:
    try:
        with _sender().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
