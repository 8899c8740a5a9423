"""Acknowledgement: signed one-use links, SMS "ACK <code>" replies, and the ladder that pages
the next people when a page is not acknowledged within ``notify.ack_minutes``.

A *page* is one escalation step of one read item (``notify_pages``): everyone it reached gets
their own message with its own code, and the first acknowledgement by any of them stops the
ladder. Not acknowledged in time, the page goes to the next level of its chain — the other
on-call people, then the item's pool, then admins and responders — each step recorded on the
item's history and audited.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
from pathlib import Path
from typing import Any

from appliance.core import audit, config, db, notifications
from appliance.reading import read_queue, worklist

log = logging.getLogger("appliance.notify")

SYSTEM = "system:notify"
KEY_NAME = "notify-links.key"
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L: read off a phone screen
CODE_LEN = 6
ACK_RE = re.compile(r"^\s*ACK\s+([A-Za-z0-9]{4,12})\s*$", re.IGNORECASE)
LADDER_KINDS = ("escalation", "breach", "critical")
URGENT = ("stat",)


class AckError(Exception):
    """The link or code is invalid, expired, used, or not the caller's; nothing changed."""


# -- signed links ---------------------------------------------------------------------------------
def link_key(cfg: config.Config) -> bytes:
    """The HMAC key of ack links (DATA_DIR/keys/notify-links.key, 0600), made on first use."""
    path = Path(cfg.keys_dir) / KEY_NAME
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        return path.read_bytes()


def _mac(key: bytes, text: str) -> str:
    digest = hmac.new(key, text.encode("ascii"), hashlib.sha256).digest()[:15]
    return base64.urlsafe_b64encode(digest).decode("ascii")


def make_token(key: bytes, message_id: int, expires: float) -> str:
    """``<message id>.<expiry>.<mac>``: short enough for an SMS, useless when altered."""
    text = f"{message_id}.{int(expires)}"
    return f"{text}.{_mac(key, text)}"


def check_token(key: bytes, token: str, now: float) -> int:
    """The message id a token names, or :class:`AckError` (altered or expired)."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        raise AckError("not an acknowledgement link")
    if not hmac.compare_digest(_mac(key, f"{parts[0]}.{parts[1]}"), parts[2]):
        raise AckError("this acknowledgement link is not valid")
    if int(parts[1]) < now:
        raise AckError("this acknowledgement link has expired")
    return int(parts[0])


def new_code(conn: sqlite3.Connection) -> str:
    """A code no open message holds (UNIQUE in the table as well)."""
    while True:
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LEN))
        if conn.execute("SELECT 1 FROM notify_messages WHERE ack_code = ?",
                        (code,)).fetchone() is None:
            return code


# -- acknowledging --------------------------------------------------------------------------------
def message(conn: sqlite3.Connection, message_id: int) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM notify_messages WHERE id = ?", (message_id,)).fetchone()
    return dict(row) if row else None


def acknowledge(conn: sqlite3.Connection, message_id: int, username: str, now: float,
                via: str, address: str = "") -> dict[str, Any]:
    """Mark the message (and its page) acknowledged by its recipient; one use only."""
    with db.transaction(conn):
        msg = message(conn, message_id)
        if msg is None:
            raise AckError("no such message")
        if msg["username"] != username:
            raise AckError("this message was sent to someone else")
        if msg["acked_at"] is not None:
            raise AckError("this message was already acknowledged")
        if msg["ack_expires"] is not None and msg["ack_expires"] < now:
            raise AckError("this acknowledgement has expired")
        conn.execute("UPDATE notify_messages SET acked_at = ? WHERE id = ?", (now, message_id))
        conn.execute("UPDATE notify_outbox SET state = 'skipped', answer = 'acknowledged'"
                     " WHERE message_id = ? AND state = 'pending'", (message_id,))
        page = _ack_page(conn, msg, username, now, via)
        audit.record(conn, username, "notify.acknowledged", f"message:{message_id}",
                     source=via, detail={"page": page, "kind": msg["kind"],
                                         "address": address}, ts=now)
    log.info("notification acknowledged", extra={"message_id": message_id, "via": via})
    return {"message_id": message_id, "page_id": page, "kind": msg["kind"]}


def _ack_page(conn: sqlite3.Connection, msg: dict[str, Any], username: str, now: float,
              via: str) -> int | None:
    if msg["page_id"] is None:
        return None
    page = conn.execute("SELECT * FROM notify_pages WHERE id = ?", (msg["page_id"],)).fetchone()
    if page["acked_at"] is None:
        conn.execute("UPDATE notify_pages SET acked_at = ?, acked_by = ?, next_at = NULL"
                     " WHERE id = ?", (now, username, page["id"]))
        if page["item_id"] is not None:
            worklist.add_history(conn, page["item_id"], now, username, "notify.acknowledged",
                                 None, None, {"page": page["id"], "via": via,
                                              "level": page["level"]})
    return page["id"]


def acknowledge_sms(conn: sqlite3.Connection, sender: str, text: str, now: float) -> bool:
    """An "ACK <code>" reply from a verified number acknowledges that user's message."""
    from appliance.notify import contacts

    m = ACK_RE.match(text)
    username = contacts.user_for_phone(conn, sender)
    row = conn.execute("SELECT id FROM notify_messages WHERE ack_code = ?",
                       (m.group(1).upper(),)).fetchone() if m else None
    if row is None or username is None:
        log.warning("SMS reply ignored: not ACK with a known code from a known number")
        return False
    try:
        acknowledge(conn, row["id"], username, now, "sms")
    except AckError as e:
        log.warning("SMS acknowledgement refused: %s", e)
        return False
    return True


# -- the ladder -----------------------------------------------------------------------------------
def ack_minutes(cfg: config.Config, priority: str, kind: str) -> float:
    urgent = priority in URGENT or kind.startswith("critical")
    return float(cfg["notify"]["ack_minutes_stat" if urgent else "ack_minutes"])


def page_for(conn: sqlite3.Connection, cfg: config.Config, n: dict[str, Any],
             now: float) -> tuple[int | None, bool]:
    """The page a notification belongs to (made for the first of an escalation step)."""
    if n["item_id"] is None or n["step_id"] is None or not n["kind"].startswith(LADDER_KINDS):
        return None, False
    row = conn.execute("SELECT id FROM notify_pages WHERE item_id = ? AND step_id = ?",
                       (n["item_id"], n["step_id"])).fetchone()
    if row:
        return row["id"], False
    item = worklist.get_item(conn, n["item_id"])
    pool = {"roles": item["pool"]["roles"], "tags": item["pool"]["tags"]}
    # One level per on-call person (the rota's fallback order), then the pool, then admins.
    chain = [[u] for u in read_queue.on_call_order(conn, n["item_id"], now)] + [
        [pool], [{"roles": list(notifications.FALLBACK_ROLES), "tags": []}]]
    cur = conn.execute(
        "INSERT INTO notify_pages (item_id, step_id, kind, priority, chain, next_at,"
        " created_at) VALUES (?,?,?,?,?,?,?)",
        (n["item_id"], n["step_id"], n["kind"], item["priority"], json.dumps(chain),
         now + ack_minutes(cfg, item["priority"], n["kind"]) * 60, now))
    return cur.lastrowid, True


def note_paged(conn: sqlite3.Connection, page_id: int, username: str) -> None:
    row = conn.execute("SELECT paged FROM notify_pages WHERE id = ?", (page_id,)).fetchone()
    paged = json.loads(row["paged"])
    if username not in paged:
        conn.execute("UPDATE notify_pages SET paged = ? WHERE id = ?",
                     (json.dumps(paged + [username]), page_id))


def escalate_unacknowledged(conn: sqlite3.Connection, cfg: config.Config, now: float) -> int:
    """Page the next level of every page not acknowledged in time; return how many moved."""
    moved = 0
    due = conn.execute("SELECT id FROM notify_pages WHERE acked_at IS NULL AND next_at <= ?"
                       " ORDER BY next_at LIMIT 100", (now,)).fetchall()
    for (page_id,) in due:
        with db.transaction(conn):
            moved += _next_level(conn, cfg, page_id, now)
    return moved


def _next_level(conn: sqlite3.Connection, cfg: config.Config, page_id: int, now: float) -> int:
    page = conn.execute("SELECT * FROM notify_pages WHERE id = ? AND acked_at IS NULL"
                        " AND next_at <= ?", (page_id, now)).fetchone()
    if page is None:
        return 0
    item = worklist.get_item(conn, page["item_id"])
    chain, paged = json.loads(page["chain"]), set(json.loads(page["paged"]))
    level = page["level"]
    if item["state"] not in read_queue.OPEN_STATES:
        conn.execute("UPDATE notify_pages SET next_at = NULL WHERE id = ?", (page_id,))
        return 0
    sent: list[str] = []
    while level < len(chain) and not sent:
        names = [u for u in notifications.resolve(conn, chain[level]) if u not in paged]
        level += 1
        if names:
            sent = notifications.notify(
                conn, names, "escalation.unacknowledged",
                f"Not acknowledged: {item['priority'].upper()} read item {item['id']}",
                "", item["id"], page["step_id"], now)
    more = level < len(chain)
    conn.execute("UPDATE notify_pages SET level = ?, next_at = ? WHERE id = ?",
                 (level, now + ack_minutes(cfg, page["priority"], page["kind"]) * 60
                  if more else None, page_id))
    detail = {"page": page_id, "level": level, "notified": sent}
    worklist.add_history(conn, item["id"], now, SYSTEM, "notify.unacknowledged", item["state"],
                         item["state"], detail)
    audit.record(conn, SYSTEM, "read_item.notify.unacknowledged", item["study_uid"],
                 source="worker", detail={"item_id": item["id"], **detail}, ts=now)
    return 1
