"""Notifications: one interface, channels behind it; today an in-app inbox per user.

Escalations, late instances and claim expiries call :func:`notify` with user
names or a pool (roles + tags).  Each channel delivers to one user; the inbox
channel stores a row the reader sees in the web app and logs the fact (never
the patient).  Email, SMS or a webhook plug in later as another channel in
:data:`CHANNELS`.  :func:`notify` runs inside the caller's transaction when
there is one (as a savepoint), so an escalation step and its notifications commit together.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.core.db import transaction

log = logging.getLogger("appliance.notifications")

# Who hears about an item nobody else can read: better a responder than silence.
FALLBACK_ROLES = ("admin", "responder")


class Channel(Protocol):
    """Delivers one notification to one user."""

    name: str

    def deliver(self, conn: sqlite3.Connection, username: str, kind: str, subject: str,
                body: str, item_id: int | None, step_id: int | None, now: float) -> None: ...


class InboxChannel:
    """Stores the notification in the user's in-app inbox."""

    name = "inbox"

    def deliver(self, conn: sqlite3.Connection, username: str, kind: str, subject: str,
                body: str, item_id: int | None, step_id: int | None, now: float) -> None:
        conn.execute(
            "INSERT INTO notifications (username, kind, subject, body, item_id, step_id,"
            " created_at) VALUES (?,?,?,?,?,?,?)",
            (username, kind, subject, body, item_id, step_id, now),
        )


CHANNELS: list[Channel] = [InboxChannel()]


class DeliveryError(Exception):
    """An outbound channel could not hand the message over; the text is its answer (no secret)."""


@dataclass(frozen=True)
class OutboundMessage:
    """What leaves the box: no patient identity, only site, priority, modality and a link.

    ``key`` is stable for one message on one channel (the email Message-ID, the SMS file's
    note, the webhook idempotency key), so a resend after a crash is recognisable.
    """

    key: str
    subject: str
    body: str
    fields: Mapping[str, Any]


class OutboundChannel(Protocol):
    """Sends one message to one address outside the box (email, SMS, webhook).

    ``send`` returns the provider's answer (a short text kept on the outbox row) once the
    provider has accepted the message, and raises :class:`DeliveryError` otherwise. It calls
    ``committing()`` at the point after which the provider holds the message (the
    whole SMTP DATA written, the HTTP POST, the file's rename). After a crash past that point
    the outbox asks ``already_sent`` (does the provider hold a message with this key? False
    when it cannot tell), then resends if ``resend_safe`` (the receiver drops a key it has
    seen), else counts the handed-over message as sent.
    """

    name: str
    resend_safe: bool

    def send(self, address: str, message: OutboundMessage,
             committing: Callable[[], None] = lambda: None) -> str: ...

    def already_sent(self, address: str, key: str) -> bool: ...


def _pool_members(conn: sqlite3.Connection, roles: Iterable[str], tags: Iterable[str]) -> list[str]:
    roles, wanted = list(roles), {t.lower() for t in tags}
    if not roles:
        return []
    rows = conn.execute(
        f"SELECT username, tags FROM users WHERE disabled = 0 AND role IN "
        f"({', '.join('?' for _ in roles)}) ORDER BY username", roles,
    ).fetchall()
    out = []
    for r in rows:
        held = {t.strip().lower() for t in (r["tags"] or "").split(",") if t.strip()}
        if wanted <= held:
            out.append(r["username"])
    return out


def resolve(conn: sqlite3.Connection, recipients: Iterable[str | Mapping[str, Any]]) -> list[str]:
    """User names from names and pool specs (``{"roles": [...], "tags": [...]}``).

    Unknown or disabled users are dropped (and logged): a typo in an on-call
    list must not stop the other notifications.
    """
    names: list[str] = []
    for r in recipients:
        if isinstance(r, Mapping):
            found = _pool_members(conn, r.get("roles", ()), r.get("tags", ()))
        else:
            row = conn.execute("SELECT username FROM users WHERE username = ? AND disabled = 0",
                               (r,)).fetchone()
            found = [row["username"]] if row else []
            if not row:
                log.warning("notification recipient %r is not an active user", r)
        names.extend(n for n in found if n not in names)
    return names


def notify(conn: sqlite3.Connection, recipients: Iterable[str | Mapping[str, Any]], kind: str,
           subject: str, body: str = "", item_id: int | None = None, step_id: int | None = None,
           now: float | None = None) -> list[str]:
    """Deliver to every recipient on every channel; return who was notified.

    When nobody resolves (an empty pool at 3 a.m.), the admins and responders
    are told instead, so an escalation is never silent.
    """
    now = time.time() if now is None else now
    names = resolve(conn, recipients)
    if not names:
        names = resolve(conn, [{"roles": FALLBACK_ROLES, "tags": ()}])
        kind = f"{kind}.unrouted"
    with transaction(conn):
        for name in names:
            for channel in CHANNELS:
                channel.deliver(conn, name, kind, subject, body, item_id, step_id, now)
    log.info("notified", extra={"kind": kind, "item_id": item_id, "recipients": len(names)})
    return names


def inbox(conn: sqlite3.Connection, username: str, unread_only: bool = False,
          limit: int = 100) -> list[dict[str, Any]]:
    """A user's notifications, newest first."""
    sql = ("SELECT id, kind, subject, body, item_id, step_id, created_at, read_at"
           " FROM notifications WHERE username = ?")
    if unread_only:
        sql += " AND read_at IS NULL"
    rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", (username, limit)).fetchall()
    return [dict(r) for r in rows]


def mark_read(conn: sqlite3.Connection, username: str, ids: Iterable[int],
              now: float | None = None) -> int:
    """Mark a user's own notifications read; return how many changed."""
    now = time.time() if now is None else now
    ids = list(ids)
    if not ids:
        return 0
    cur = conn.execute(
        f"UPDATE notifications SET read_at = ? WHERE username = ? AND read_at IS NULL AND id IN"
        f" ({', '.join('?' for _ in ids)})", (now, username, *ids),
    )
    return cur.rowcount


def after(conn: sqlite3.Connection, last_id: int, since: float = 0.0,
          limit: int = 200) -> list[dict[str, Any]]:
    """Notifications with an id above ``last_id`` created at or after ``since``, oldest first.

    What the notify capability reads to send each one out by mail, SMS or webhook: the
    inbox row is the durable record, so a notification is never lost between the two.
    """
    rows = conn.execute(
        "SELECT id, username, kind, subject, body, item_id, step_id, created_at"
        " FROM notifications WHERE id > ? AND created_at >= ? ORDER BY id LIMIT ?",
        (last_id, since, limit)).fetchall()
    return [dict(r) for r in rows]
