"""The worklist's ETag: a refresh that would show the same rows answers ``304 Not Modified``.

Twenty readers polling 10,000 open items every few seconds mostly ask for rows they already
have. The tag is computed from what the rows depend on, in two indexed lookups, before the
worklist query runs (a change committed in between makes the next refresh a 200, never a
missed change):

- the worklist version: a counter bumped by triggers (migration 20) in the same transaction
  as any change to ``read_items``, ``studies`` or ``series`` (state, claim, due time,
  breach, late or arriving images, image count, patient, body part);
- the caller: user id, name, role and tags (pools, sites). The same version means other
  rows to another reader, so one reader's tag never matches another's;
- the caller's live break-glass grants: they open studies and lapse without any write;
- the view and its filters (the query string, in a canonical order).

The tag is weak (``W/``): the body also carries the server's clock, which a 304 leaves
as the client had it. Responses stay ``Cache-Control: no-store`` (they name patients): the
page's script keeps its last rows in memory and sends ``If-None-Match`` itself.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping
from typing import Any

from flask import Response, request

from appliance.accounts import permissions


def version(conn: sqlite3.Connection) -> int:
    """The worklist version (0 before any change)."""
    row = conn.execute("SELECT version FROM worklist_version WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def etag(conn: sqlite3.Connection, view: str, user: Mapping[str, Any], args: Any,
         now: float) -> str:
    """The (unquoted) tag of ``view`` for ``user`` with query ``args`` at ``now``."""
    pairs = sorted(args.items(multi=True)) if hasattr(args, "items") else sorted(args)
    key = json.dumps([
        view, version(conn), user.get("id"), user.get("username"), user.get("role"),
        sorted(permissions.user_tags(user)), sorted(permissions.grants(conn, user, now)),
        pairs,
    ], separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def unchanged(tag: str) -> bool:
    """Whether the request's ``If-None-Match`` names ``tag`` (weak comparison)."""
    return request.if_none_match.contains_weak(tag)


def not_modified(tag: str) -> Response:
    """An empty 304 carrying the tag again."""
    resp = Response(status=304)
    resp.set_etag(tag, weak=True)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def tagged(resp: Response, tag: str) -> Response:
    resp.set_etag(tag, weak=True)
    return resp
