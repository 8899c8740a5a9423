"""Contact points: a user's email address and phone number, each used only once verified.

A new or changed address gets a six-digit code sent to it (through the outbox like any
message); the user proves the address by giving the code back (`appliance notify verify`).
Until then nothing is sent there: a typo must not page a stranger.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from typing import Any

from appliance.core import db

CHANNELS = ("email", "sms")  # in failover order: the first verified one is tried first
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
PHONE_RE = re.compile(r"^\+[0-9]{6,20}$")
CODE_MINUTES = 60


class ContactError(ValueError):
    """A contact point is malformed, unknown, or its code is wrong; nothing was changed."""


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode("ascii")).hexdigest()


def check_address(channel: str, address: str) -> str:
    """The address normalised, or :class:`ContactError` saying what a good one looks like."""
    address = address.strip()
    if channel == "email" and not EMAIL_RE.match(address):
        raise ContactError(f"not an email address: {address!r}")
    if channel == "sms":
        address = address.replace(" ", "").replace("-", "")
        if not PHONE_RE.match(address):
            raise ContactError(f"not a phone number in international form (+2547…): {address!r}")
    if channel not in CHANNELS:
        raise ContactError(f"unknown channel {channel!r} (channels: {', '.join(CHANNELS)})")
    return address


def set_contact(conn: sqlite3.Connection, username: str, channel: str, address: str,
                now: float) -> str:
    """Store an unverified address; return the verification code to send to it."""
    address = check_address(channel, address)
    code = f"{secrets.randbelow(10**6):06d}"
    with db.transaction(conn):
        conn.execute(
            "INSERT INTO notify_contacts (username, channel, address, rank, code_hash,"
            " code_expires, verified_at, created_at) VALUES (?,?,?,?,?,?,NULL,?)"
            " ON CONFLICT(username, channel) DO UPDATE SET address = excluded.address,"
            " code_hash = excluded.code_hash, code_expires = excluded.code_expires,"
            " verified_at = NULL",
            (username, channel, address, CHANNELS.index(channel), _hash(code),
             now + CODE_MINUTES * 60, now))
    return code


def verify(conn: sqlite3.Connection, username: str, channel: str, code: str,
           now: float) -> None:
    """Mark the address verified if ``code`` is the one sent and has not expired."""
    row = conn.execute("SELECT code_hash, code_expires FROM notify_contacts WHERE username = ?"
                       " AND channel = ?", (username, channel)).fetchone()
    if row is None or row["code_hash"] is None:
        raise ContactError(f"{username} has no {channel} address waiting for a code")
    if row["code_expires"] < now:
        raise ContactError("the code has expired: set the address again for a new one")
    if not secrets.compare_digest(row["code_hash"], _hash(code.strip())):
        raise ContactError("wrong code")
    with db.transaction(conn):
        conn.execute("UPDATE notify_contacts SET verified_at = ?, code_hash = NULL,"
                     " code_expires = NULL WHERE username = ? AND channel = ?",
                     (now, username, channel))


def verified(conn: sqlite3.Connection, username: str) -> list[tuple[str, str]]:
    """(channel, address) of a user's verified contact points, in failover order."""
    rows = conn.execute("SELECT channel, address FROM notify_contacts WHERE username = ?"
                        " AND verified_at IS NOT NULL ORDER BY rank", (username,))
    return [(r["channel"], r["address"]) for r in rows]


def user_for_phone(conn: sqlite3.Connection, number: str) -> str | None:
    """The user whose verified phone number this is (an SMS reply's sender)."""
    row = conn.execute("SELECT username FROM notify_contacts WHERE channel = 'sms' AND"
                       " address = ? AND verified_at IS NOT NULL", (number,)).fetchone()
    return row["username"] if row else None


def listing(conn: sqlite3.Connection, username: str) -> list[dict[str, Any]]:
    """A user's contact points for the account page and `notify status`."""
    return [dict(r) for r in conn.execute(
        "SELECT channel, address, verified_at FROM notify_contacts WHERE username = ?"
        " ORDER BY rank", (username,))]
