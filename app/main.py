"""create_app(): routers, error handlers, middleware (request ids, HTTP metrics), and the lifespan (bootstrap
admin key, reaper and webhook sender threads)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import docs as api_docs
from app.api.prometheus import HttpMetricsMiddleware
from app.api.routes import comparison, dashboard, datasets, health, jobs, keys, models, recipes, sweeps, teams, webhooks
from app.background import start_background_threads
from app.blobs.store import secure_data_dir
from app.core import errors, security
from app.core.auth import ensure_bootstrap_admin
from app.core.config import get_settings
from app.core.db import session_scope
from app.core.logging import RequestContextMiddleware, configure_logging

log = logging.getLogger("squeeze.api")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    secure_data_dir(settings)
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    if settings.bootstrap_admin_key:
        with session_scope() as db:
            ensure_bootstrap_admin(db, settings.bootstrap_admin_key, settings.bootstrap_admin_team)
    stop = start_background_threads()
    yield
    stop.set()


def create_app() -> FastAPI:
    configure_logging()
    app = FastAPI(title="Squeeze", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Self-hosted model compression: upload a model, run a recipe, get a smaller, "
                              "faster model and a measured report.")
    errors.install(app)
    security.install(app)  # headers, body caps, CORS: inside the metrics and request-id layers
    app.add_middleware(HttpMetricsMiddleware)
    app.add_middleware(RequestContextMiddleware)  # outermost: its request id covers every log line of the request
    for module in (health, keys, teams, models, comparison, datasets, jobs, sweeps, recipes, webhooks, dashboard):
        app.include_router(module.router)
    app.include_router(api_docs.router_for(app))  # /docs and /redoc, their assets served here (no CDN)
    return app
