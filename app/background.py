"""The background threads every API and worker process runs: the job reaper (app/jobs/lifecycle.py) and the
webhook sender (app/webhooks/delivery.py). Both claim their rows atomically, so any number of processes may run
them side by side."""

from __future__ import annotations

import threading

from app.core.config import get_settings
from app.jobs.lifecycle import start_reaper
from app.webhooks.delivery import start_sender


def start_background_threads() -> threading.Event:
    """Starts the reaper and the webhook sender; returns the event that stops both."""
    stop = threading.Event()
    start_reaper(stop)
    start_sender(stop, get_settings())
    return stop
