"""create_app(): routers, error handlers, and the lifespan (bootstrap admin key, reaper thread)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import errors
from app.auth import ensure_bootstrap_admin
from app.config import get_settings
from app.db import session_scope
from app.lifecycle import start_reaper
from app.routes import comparison, dashboard, datasets, health, jobs, keys, models, recipes, sweeps

log = logging.getLogger("squeeze.api")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    for d in (settings.data_dir, settings.tmp_dir):
        d.mkdir(parents=True, exist_ok=True)
    if settings.bootstrap_admin_key:
        with session_scope() as db:
            ensure_bootstrap_admin(db, settings.bootstrap_admin_key, settings.bootstrap_admin_team)
    stop = start_reaper()
    yield
    stop.set()


def create_app() -> FastAPI:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = FastAPI(title="Squeeze", version="0.1.0", lifespan=lifespan,
                  description="Self-hosted model compression: upload a model, run a recipe, get a smaller, "
                              "faster model and a measured report.")
    errors.install(app)
    for module in (health, keys, models, comparison, datasets, jobs, sweeps, recipes, dashboard):
        app.include_router(module.router)
    return app
