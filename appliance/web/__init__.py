"""Request plumbing shared by every capability's pages: the request's database connection.

``templates/`` and ``static/`` beside this module hold every page and asset; the
application factory is ``appliance.app.create_app``.
"""

from __future__ import annotations

import os
import sqlite3
import threading

from flask import current_app, g

from appliance.core import db

_KEPT = threading.local()  # this thread's connection per database, reused request to request


def get_db() -> sqlite3.Connection:
    """The request's connection: the thread's own, opened on first use after the fork.

    Opening one costs ~4 ms (connect and pragmas) against ~0.05 ms for a worklist's version
    lookup, so a gunicorn thread keeps its connection from one request to the next
    (:func:`release_db` rolls back anything a request left open).
    """
    if "db" not in g:
        key = (os.getpid(), str(current_app.config["DB_PATH"]))
        kept = getattr(_KEPT, "conns", None)
        if kept is None:
            kept = _KEPT.conns = {}
        conn = kept.pop(key, None)
        g.db = conn if conn is not None else db.connect(key[1])
        g.db_key = key
    return g.db


def release_db() -> None:
    """End of request: the connection goes back to its thread, never with a transaction
    open (a request that died mid-transaction is rolled back here)."""
    conn = g.pop("db", None)
    if conn is None:
        return
    key = g.pop("db_key", None)
    try:
        if conn.in_transaction:
            conn.rollback()
    except sqlite3.Error:
        conn.close()
        return
    if key is None or key[0] != os.getpid():
        conn.close()
        return
    for other in [k for k in _KEPT.conns if k != key]:  # one database per thread is kept
        _KEPT.conns.pop(other).close()
    _KEPT.conns[key] = conn
