"""Prometheus metrics served by the API at GET /metrics (README "Metrics and logs" has the table).

API and workers are separate processes (and there may be several APIs), so everything about jobs is read
from the database when /metrics is scraped; only the HTTP metrics are this process's own.

- squeeze_http_requests_total{method,route,status}: requests this process answered; `route` is the path
  template (/v1/jobs/{job_id}), `unmatched` for unknown paths (labels stay bounded).
- squeeze_http_request_duration_seconds{method,route}: time to answer them.
- squeeze_jobs{status}, squeeze_queue_depth{queue}: jobs by status; queued jobs per queue.
- squeeze_job_failures_total{code}: failed jobs by error code (codes outside KNOWN_CODES count as `other`:
  a code can come from the untrusted sandbox). squeeze_sandbox_failures_total{code}: the sandbox's own
  failures (SANDBOX_CODES).
- squeeze_job_duration_seconds{status}: started -> finished of jobs finished since this process started;
  squeeze_step_duration_seconds{step_type}: engine seconds of each of their recipe steps.
- squeeze_webhook_deliveries_pending: delivery attempts waiting to be sent (due or backing off).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.core.tables import Job
from app.jobs.states import JOB_STATUSES
from app.webhooks.delivery import pending_count

REGISTRY = CollectorRegistry(auto_describe=True)
SANDBOX_CODES = ("resource_limit", "timeout", "sandbox_crashed", "bad_artifact")
KNOWN_CODES = frozenset((*SANDBOX_CODES, "worker_lost", "guard_failed", "internal", "input_missing", "bad_model",
                         "unsupported", "unsupported_pattern", "bad_dataset", "bad_teacher", "no_effect", "diverged",
                         "device_unavailable", "runtime_unavailable", "engine_error", "artifact_lost"))
# Reading jobs finished "since the last scrape" looks back this far, so a job committed late is still seen.
OVERLAP = timedelta(minutes=2)

HTTP_REQUESTS = Counter("squeeze_http_requests", "HTTP requests answered by this API process.",
                        ["method", "route", "status"], registry=REGISTRY)
HTTP_LATENCY = Histogram("squeeze_http_request_duration_seconds", "Time to answer an HTTP request.",
                         ["method", "route"], registry=REGISTRY,
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
JOB_DURATION = Histogram("squeeze_job_duration_seconds", "Started-to-finished time of jobs that finished since "
                         "this API process started.", ["status"], registry=REGISTRY,
                         buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600))
STEP_DURATION = Histogram("squeeze_step_duration_seconds", "Engine seconds of one recipe step, by step type.",
                          ["step_type"], registry=REGISTRY,
                          buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))


class _Database(Collector):
    """Job gauges and counters from the database, computed by `refresh` (once per scrape)."""

    def __init__(self) -> None:
        self.families: list = []
        self.started = self.since = utcnow()  # durations count the jobs that finish from now on
        self.seen: dict[str, datetime] = {}  # jobs observed within the overlap window

    def collect(self) -> Iterator:
        yield from self.families

    def refresh(self, db: Session) -> None:
        by_status = dict(db.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        jobs = GaugeMetricFamily("squeeze_jobs", "Jobs in the database by status.", labels=["status"])
        for status in JOB_STATUSES:
            jobs.add_metric([status], by_status.get(status, 0))
        depth = GaugeMetricFamily("squeeze_queue_depth", "Queued jobs per queue.", labels=["queue"])
        for queue, n in db.execute(select(Job.queue, func.count()).where(Job.status == "queued")
                                   .group_by(Job.queue)):
            depth.add_metric([queue], n)
        failures: dict[str, int] = {}
        for code, n in db.execute(select(Job.error_code, func.count()).where(Job.status == "failed")
                                  .group_by(Job.error_code)):
            label = code if code in KNOWN_CODES else "other"
            failures[label] = failures.get(label, 0) + n
        failed = CounterMetricFamily("squeeze_job_failures", "Failed jobs by error code.", labels=["code"])
        sandbox = CounterMetricFamily("squeeze_sandbox_failures", "Jobs failed by the sandbox itself (killed at a "
                                      "resource limit, timed out, crashed, or wrote an unusable artifact).",
                                      labels=["code"])
        for code, n in sorted(failures.items()):
            failed.add_metric([code], n)
        for code in SANDBOX_CODES:
            sandbox.add_metric([code], failures.get(code, 0))
        pending = GaugeMetricFamily("squeeze_webhook_deliveries_pending", "Webhook delivery attempts waiting to "
                                    "be sent.", value=pending_count(db))
        self._observe_finished(db)
        self.families = [jobs, depth, failed, sandbox, pending]

    def _observe_finished(self, db: Session) -> None:
        now = utcnow()
        rows = db.execute(select(Job.id, Job.status, Job.started_at, Job.finished_at, Job.recipe["steps"],
                                 Job.metrics["run"]["step_seconds"])
                          .where(Job.finished_at > self.since - OVERLAP))
        for job_id, status, started_at, finished_at, steps, step_seconds in rows:
            if job_id in self.seen or finished_at < self.started:
                continue
            self.seen[job_id] = finished_at
            if started_at is not None:
                JOB_DURATION.labels(status).observe(max(0.0, (finished_at - started_at).total_seconds()))
            for step, seconds in zip(steps or [], step_seconds or []):
                if isinstance(step, dict) and isinstance(seconds, (int, float)):
                    STEP_DURATION.labels(str(step.get("type"))[:40]).observe(seconds)
        self.since = now  # the next query looks back OVERLAP from here; older ids cannot come back
        self.seen = {k: v for k, v in self.seen.items() if v > now - 2 * OVERLAP}


_database = _Database()
REGISTRY.register(_database)
_lock = threading.Lock()


def scrape(db: Session) -> bytes:
    with _lock:
        _database.refresh(db)
        return generate_latest(REGISTRY)


class HttpMetricsMiddleware:
    """Counts and times requests by the route template (bounded labels: never the raw path)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - started)
