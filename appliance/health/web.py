"""Health endpoints: /livez (process alive), /readyz (can it do its job?), /healthz (alias).

/readyz answers 503 with every reason it found, so a responder sees what to
fix, not only that something is wrong.  The checks live in
:mod:`appliance.health.readiness` (the status page and the worker's sampler use the
same ones); each is bounded so /readyz answers within a few seconds even while
the database is locked.  No login: load balancers and systemd probes call them.
"""

from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify

from appliance.health import readiness

bp = Blueprint("health", __name__)


def _public(view):
    """Mark a view open to anyone (the auth area's permission table test reads this)."""
    view.auth_public = True
    return view


@bp.get("/livez")
@_public
def livez():
    return jsonify(status="ok", ts=time.time())


@bp.get("/readyz")
@bp.get("/healthz")
@_public
def readyz():
    ok, reasons, checks = readiness.check(current_app.config["SITE"])
    body = {"status": "ok" if ok else "unavailable", "reasons": reasons, "checks": checks}
    return jsonify(body), (200 if ok else 503)
