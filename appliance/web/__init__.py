"""The web app: Flask application factory, one blueprint per area (Flask tutorial style)."""

from __future__ import annotations

import importlib
import sqlite3
from typing import Any

from flask import Flask, g

from appliance import config as site_config
from appliance import db

# One blueprint per area; each module exposes ``bp``. A module not written yet is skipped.
BLUEPRINT_MODULES = (
    "appliance.web.health",  # /livez /readyz /healthz
    "appliance.web.status_page",  # /status, /metrics
    "appliance.web.auth_views",  # /login /logout, TOTP
    "appliance.web.admin",  # users, audit trail
    "appliance.web.api",  # /api/v1 JSON: worklist, metrics
    "appliance.web.ui",  # worklist, turnaround dashboard (HTML)
    "appliance.web.reports",  # report editor, critical findings, printable reports
    "appliance.web.dicomweb",  # /dicom-web
    "appliance.web.viewer",  # /viewer (OHIF)
    "appliance.web.consults",  # consult signaling
)


def create_app(cfg: site_config.Config, overrides: dict[str, Any] | None = None) -> Flask:
    """Build the app for one data directory. Connections open per request, after fork."""
    app = Flask(__name__)
    app.config.update(
        SITE=cfg,
        DB_PATH=str(cfg.db_path),
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
    )
    if overrides:
        app.config.update(overrides)

    for name in BLUEPRINT_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # an area not written yet
        app.register_blueprint(module.bp)

    @app.teardown_appcontext
    def close_db(_exc: BaseException | None) -> None:
        conn = g.pop("db", None)
        if conn is not None:
            conn.close()

    return app


def get_db() -> sqlite3.Connection:
    """The request's connection (opened on first use, closed at teardown)."""
    from flask import current_app

    if "db" not in g:
        g.db = db.connect(current_app.config["DB_PATH"])
    return g.db
