"""The web app: Flask application factory, one blueprint per area (Flask tutorial style).

Blueprints are registered by name from ``BLUEPRINT_MODULES``; each module exposes ``bp``.
A module that is missing fails ``create_app`` (and so the web process at start): a page
never vanishes without a word because a module was renamed.
"""

from __future__ import annotations

import importlib
from typing import Any

from flask import Flask

from appliance import web
from appliance.core import config as site_config

# One blueprint per area; each module exposes ``bp``.
BLUEPRINT_MODULES = (
    "appliance.health.web",  # /livez /readyz /healthz
    "appliance.health.status_page",  # /status, /metrics
    "appliance.accounts.web",  # /login /logout, TOTP, password, break-glass
    "appliance.accounts.admin",  # users, audit trail
    "appliance.reading.api",  # /api/v1 JSON: worklist, metrics
    "appliance.reading.web",  # worklist, turnaround dashboard (HTML)
    "appliance.reports.web",  # report editor, critical findings, printable reports
    "appliance.dicomweb.web",  # /dicom-web
    "appliance.dicomweb.viewer",  # /viewer (OHIF)
    "appliance.consults.web",  # consult signaling
    "appliance.notify.web",  # /notify/ack/<token>: acknowledgement links
    "appliance.patients.web",  # registration desk, trauma identities, wristbands
)


def create_app(cfg: site_config.Config, overrides: dict[str, Any] | None = None) -> Flask:
    """Build the app for one data directory. Connections open per request, after fork."""
    # Named for the web package, so templates/ and static/ are found in appliance/web/.
    app = Flask("appliance.web")
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
        app.register_blueprint(importlib.import_module(name).bp)

    @app.teardown_appcontext
    def close_db(_exc: BaseException | None) -> None:
        web.release_db()  # kept for the thread's next request

    return app
