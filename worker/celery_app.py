"""Celery configuration of the worker: late acks, one message at a time, the job row as the truth."""

from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_ready, worker_shutting_down

from app.background import start_background_threads
from app.blobs.store import secure_data_dir
from app.core.config import get_settings
from app.core.logging import configure_logging
from app.queue.broker import celery_config
from worker import launch

celery = Celery("squeeze", include=["worker.tasks"])
celery.conf.update(
    celery_config(get_settings()),
    # A message is acknowledged after the task ran; a lost worker's message may come back, and the
    # atomic claim makes that redelivery a no-op if another worker already took the job.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
app = celery  # `celery -A worker.celery_app` finds either name

_reaper_stop = None


@setup_logging.connect
def _logging(**_):  # connected: Celery leaves logging to us (JSON lines with the job id, as the API's)
    configure_logging()


@worker_init.connect
def _secure_files(**_):  # before the pool forks: every process of the worker creates files 0600
    secure_data_dir(get_settings())


@worker_ready.connect
def _start_reaper(**_):
    global _reaper_stop
    _reaper_stop = start_background_threads()
    launch.start_pool(get_settings())  # warm sandboxes (docs/security.md)


@worker_shutting_down.connect
def _stop_reaper(**_):
    launch.stop_pool()
    if _reaper_stop is not None:
        _reaper_stop.set()
