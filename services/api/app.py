"""The API application: routes, error answers, health probes and the web page.

``create_app(url)`` is all a server, a test or a benchmark needs; ``facecluster serve`` and
``python -m services.api`` run it under uvicorn.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker

from facecore.settings import Settings

from .. import thumbnails
from ..persons.service import Refused
from ..settings import ServiceSettings
from ..store.db import make_engine, migrate, session_factory
from ..store.repository import NotFound
from .routes import router

log = logging.getLogger("facecluster.api")

STATIC = Path(__file__).resolve().parent / "static"


def _problem(status: int, detail) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def create_app(database_url: str | None = None, *, settings: Settings | None = None,
               service_settings: ServiceSettings | None = None, sessions: sessionmaker[Session] | None = None,
               run_migrations: bool = True) -> FastAPI:
    settings = settings or Settings()
    service_settings = service_settings or ServiceSettings()
    if sessions is None:
        engine = make_engine(database_url or settings.database_url)
        if run_migrations:
            migrate(engine)
        sessions = session_factory(engine)

    app = FastAPI(title="facecluster", version="1",
                  description="Person albums of a photo library: people, their faces and photos, and the "
                              "user's corrections (rename, merge, split, hide, \"not this person\", undo). "
                              "Every /api/v1 call needs `Authorization: Bearer <token>`.")
    app.state.sessions = sessions
    app.state.object_store = settings.object_store
    app.state.thumbnails = thumbnails.ThumbnailCache(service_settings.thumbnail_cache)

    @app.exception_handler(NotFound)
    def not_found(_request: Request, e: NotFound):
        return _problem(404, f"no {e.args[0] if e.args else 'such object'}")

    @app.exception_handler(Refused)
    def refused(_request: Request, e: Refused):
        return _problem(409, str(e))

    @app.exception_handler(thumbnails.PhotoUnavailable)
    def unavailable(_request: Request, e: thumbnails.PhotoUnavailable):
        return _problem(404, str(e))

    @app.exception_handler(RequestValidationError)
    def invalid(_request: Request, e: RequestValidationError):
        # FastAPI's list of problems, minus the echoed input (it may be large or binary).
        return _problem(422, [{k: v for k, v in err.items() if k in ("loc", "msg", "type")} for err in e.errors()])

    @app.get("/healthz", tags=["probes"])
    def healthz() -> dict:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], responses={503: {"description": "the database is not ready"}})
    def readyz():
        """The database answers and its schema is the one this code expects."""
        from alembic.script import ScriptDirectory
        from alembic.config import Config

        from ..store.db import MIGRATIONS

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        head = ScriptDirectory.from_config(config).get_current_head()
        try:
            with sessions() as session:
                current = session.scalar(sa.text("SELECT version_num FROM alembic_version"))
        except sa.exc.SQLAlchemyError as e:
            return _problem(503, f"database not reachable: {str(e).splitlines()[0][:200]}")
        if current != head:
            return _problem(503, f"database schema is at {current}, this code needs {head}: run the migrations")
        return {"status": "ready", "schema": current}

    app.include_router(router)
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


def app_from_environment() -> FastAPI:
    """The app of one worker of ``facecluster serve --workers N`` (a uvicorn factory): settings
    from the environment (FACECLUSTER_DATABASE_URL, FACECLUSTER_CONFIG), schema already migrated."""
    return create_app(run_migrations=False)
