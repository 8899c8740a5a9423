"""API tokens for scripts and DICOMweb clients, sent as ``Authorization: Bearer …``.

A token is shown once, when it is created; only its SHA-256 is stored. A
token has 256 random bits, so a fast hash is enough (unlike a password, it
cannot be guessed from a dictionary), and checking one costs a single
indexed lookup on every API call.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from typing import Any

PREFIX = "fat_"  # "field appliance token": lets secret scanners and humans spot one
TOUCH_EVERY_S = 60  # last_used_at is refreshed at most this often (one write per minute)


class TokenError(Exception):
    """A token cannot be created or changed; the message is shown as is."""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_duration(text: str) -> int:
    """``30d``, ``12h``, ``45m``, ``90s`` or a bare number of seconds → seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text or "")
    if not m or int(m.group(1)) <= 0:
        raise TokenError(f"bad duration {text!r}: use e.g. 30d, 12h, 45m")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return int(m.group(1)) * unit


def create_token(conn: sqlite3.Connection, username: str, expires_in_s: float | None = None,
                 label: str = "", now: float | None = None) -> str:
    """Create a token for ``username``; return the secret (the only time it exists in clear)."""
    user = conn.execute("SELECT id, disabled FROM users WHERE username = ?", (username,)).fetchone()
    if user is None:
        raise TokenError(f"no user named {username!r}")
    if user["disabled"]:
        raise TokenError(f"user {username!r} is disabled")
    if expires_in_s is not None and expires_in_s <= 0:
        raise TokenError("expiry must be in the future")
    now = time.time() if now is None else now
    secret = PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO api_tokens (user_id, token_hash, prefix, label, created_at, expires_at)"
        " VALUES (?,?,?,?,?,?)",
        (user["id"], _hash(secret), secret[:10], label, now,
         None if expires_in_s is None else now + expires_in_s),
    )
    return secret


def revoke(conn: sqlite3.Connection, token_id: int, now: float | None = None) -> bool:
    """Revoke a token by id; False when there is no such live token."""
    cur = conn.execute(
        "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (time.time() if now is None else now, token_id),
    )
    return cur.rowcount == 1


def verify(conn: sqlite3.Connection, token: str, now: float | None = None) -> dict[str, Any] | None:
    """The user a live token belongs to (user columns plus ``token_id``), or None.

    None for an unknown, revoked or expired token and for a disabled user.
    """
    if not token or not token.startswith(PREFIX) or len(token) > 200:
        return None
    now = time.time() if now is None else now
    row = conn.execute(
        "SELECT t.id AS token_id, t.expires_at, t.revoked_at, t.last_used_at, u.*"
        " FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?",
        (_hash(token),),
    ).fetchone()
    if row is None or row["revoked_at"] is not None or row["disabled"]:
        return None
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return None
    if row["last_used_at"] is None or now - row["last_used_at"] >= TOUCH_EVERY_S:
        conn.execute("UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (now, row["token_id"]))
    return dict(row)


def list_tokens(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every token with its owner and state, newest first (never the secret)."""
    return [dict(r) for r in conn.execute(
        "SELECT t.id, u.username, t.prefix, t.label, t.created_at, t.expires_at,"
        " t.last_used_at, t.revoked_at FROM api_tokens t JOIN users u ON u.id = t.user_id"
        " ORDER BY t.id DESC"
    )]
