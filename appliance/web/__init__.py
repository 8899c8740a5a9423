"""The web app: Flask application factory, one blueprint per area (Flask tutorial style)."""

from __future__ import annotations

import sqlite3
from typing import Any

from flask import Flask, g

from appliance import config as site_config
from appliance import db


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

    from appliance.web import health

    app.register_blueprint(health.bp)

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
