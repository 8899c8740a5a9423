"""Request plumbing shared by every capability's pages: the request's database connection.

``templates/`` and ``static/`` beside this module hold every page and asset; the
application factory is ``appliance.app.create_app``.
"""

from __future__ import annotations

import sqlite3

from flask import current_app, g

from appliance.core import db


def get_db() -> sqlite3.Connection:
    """The request's connection (opened on first use, closed at teardown)."""
    if "db" not in g:
        g.db = db.connect(current_app.config["DB_PATH"])
    return g.db
