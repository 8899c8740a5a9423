"""The delivery outbox: every notification sent out by each channel its user can be reached on.

Durable state is ours (``notify_outbox``), not huey's: one row per message and channel with
its attempts, next attempt, lease and the provider's answer. A pass of :func:`sweep`

1. turns new inbox notifications into messages (no patient data: site, priority, modality,
   body part, minutes left, an acknowledgement link and code) and outbox rows;
2. pages the next level of escalation pages nobody acknowledged in time;
3. reads "ACK <code>" replies from gammu-smsd's inbox;
4. sends what is due: a user's first channel at once, the next one only when the first has
   not delivered within ``notify.failover_s`` (email down → SMS after 2 minutes), each with
   backoff between attempts.

Exactly once per channel: a row is leased (``sending``) before the provider is called and
marked ``sent`` after; a row found ``sending`` under a dead or expired lease is re-sent only
after asking the channel whether it already holds the row's key (the SMS file's note; the
webhook receiver and mail systems see the same idempotency key / Message-ID again).
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance.core import audit, config, db, leases, metrics, notifications
from appliance.core.notifications import DeliveryError, OutboundChannel, OutboundMessage
from appliance.notify import acks, alerts, channels, contacts
from appliance.reading import read_queue, worklist

log = logging.getLogger("appliance.notify")

BACKLOG_S = 3600  # on the first pass ever, older inbox rows are not sent out (history)
BATCH = 50
LEASE_S = 60
Clock = Callable[[], float]


# -- messages ------------------------------------------------------------------------------------
def _link_base(cfg: config.Config) -> str:
    public = str(cfg["web"].get("public_url") or "").rstrip("/")
    return public or f"https://{socket.gethostname()}:{cfg['web']['port']}"


def _item_fields(conn: sqlite3.Connection, item_id: int | None, now: float) -> dict[str, Any]:
    """What a message may say about an item: never the patient, the study text or its UID."""
    if item_id is None:
        return {}
    item = worklist.get_item(conn, item_id)
    facts = read_queue.study_facts(conn, item["study_uid"])
    left = (item["due_at"] - now) / 60.0
    return {"item_id": item_id, "priority": item["priority"].upper(),
            "modality": "/".join(item["modalities"]),
            "body_part": "/".join(facts.body_parts) if facts else "",
            "minutes_left": round(left)}


def compose(cfg: config.Config, n: dict[str, Any], fields: dict[str, Any], token: str,
            code: str) -> tuple[str, str]:
    """Subject and body. Item messages are built from the item's fields only: the inbox
    body of other notifications is ours (health alerts, tests), never study text."""
    site = cfg["site"]["name"]
    lines = [f"{site}: {n['subject']}"]
    if fields:
        left = fields["minutes_left"]
        lines.append(f"{fields['priority']} {fields['modality']} {fields['body_part']}".strip())
        lines.append(f"due in {left} min" if left >= 0 else f"{-left} min overdue")
    elif n["body"]:
        lines.append(n["body"])
    lines.append(f"Acknowledge: {_link_base(cfg)}/notify/ack/{token}")
    lines.append(f"Or reply by SMS: ACK {code}")
    return f"[{site}] {n['subject']}", "\n".join(lines) + "\n"


def fan_out(conn: sqlite3.Connection, cfg: config.Config, now: float,
            available: dict[str, OutboundChannel]) -> int:
    """One message per new inbox notification, one outbox row per reachable channel."""
    made = 0
    while True:
        last = conn.execute("SELECT COALESCE(MAX(notification_id), 0) FROM notify_messages"
                            ).fetchone()[0]
        rows = notifications.after(conn, last, 0.0 if last else now - BACKLOG_S, BATCH)
        for n in rows:
            with db.transaction(conn):
                _message(conn, cfg, n, now, available)
                made += 1
        if len(rows) < BATCH:
            return made


def _message(conn: sqlite3.Connection, cfg: config.Config, n: dict[str, Any], now: float,
             available: dict[str, OutboundChannel]) -> None:
    key = acks.link_key(cfg)
    page_id, new_page = acks.page_for(conn, cfg, n, now)
    fields = _item_fields(conn, n["item_id"], now)
    code = acks.new_code(conn)
    expires = now + float(cfg["notify"]["link_minutes"]) * 60
    cur = conn.execute(
        "INSERT INTO notify_messages (notification_id, username, kind, subject, body, page_id,"
        " ack_code, ack_expires, created_at) VALUES (?,?,?,?,'',?,?,?,?)",
        (n["id"], n["username"], n["kind"], n["subject"], page_id, code, expires, now))
    mid = cur.lastrowid
    subject, body = compose(cfg, n, fields, acks.make_token(key, mid, expires), code)
    conn.execute("UPDATE notify_messages SET subject = ?, body = ? WHERE id = ?",
                 (subject, body, mid))
    if page_id is not None:
        acks.note_paged(conn, page_id, n["username"])
    targets = [(ch, addr) for ch, addr in contacts.verified(conn, n["username"])
               if ch in available]
    if "webhook" in available and (new_page or (page_id is None
                                                and not _webhook_has(conn, n, subject, now))):
        targets.append(("webhook", cfg["notify"]["webhook_url"]))
    failover = float(cfg["notify"]["failover_s"])
    for rank, (channel, address) in enumerate(targets):
        conn.execute(
            "INSERT INTO notify_outbox (message_id, channel, address, rank, idempotency_key,"
            " not_before, next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?)",
            (mid, channel, address, rank, f"n{mid}-{channel}-{code.lower()}",
             now + (rank * failover if channel != "webhook" else 0), now, now))


def enqueue_direct(conn: sqlite3.Connection, cfg: config.Config, username: str, kind: str,
                   subject: str, body: str, targets: list[tuple[str, str]],
                   now: float) -> list[int]:
    """A message to given (channel, address) pairs, not through the inbox: a verification
    code goes to the address being verified, never to the in-app inbox. Returns row ids."""
    site = cfg["site"]["name"]
    ids = []
    with db.transaction(conn):
        code = acks.new_code(conn)
        cur = conn.execute(
            "INSERT INTO notify_messages (notification_id, username, kind, subject, body,"
            " ack_code, ack_expires, created_at) VALUES (NULL,?,?,?,?,?,?,?)",
            (username, kind, f"[{site}] {subject}", f"{site}: {subject}\n{body}\n", code, now,
             now))
        for channel, address in targets:
            ids.append(conn.execute(
                "INSERT INTO notify_outbox (message_id, channel, address, rank, idempotency_key,"
                " not_before, next_attempt_at, created_at) VALUES (?,?,?,0,?,?,?,?)",
                (cur.lastrowid, channel, address, f"n{cur.lastrowid}-{channel}-{code.lower()}",
                 now, now, now)).lastrowid)
    return ids


def send_verification(conn: sqlite3.Connection, cfg: config.Config, username: str,
                      channel: str, address: str, now: float) -> dict[str, Any]:
    """Store ``address`` unverified and send its code there now (by that channel only).

    The one path for `notify contact`, `user modify --email/--phone` and the account page,
    so each stores, sends and reports the same way. Returns the outbox row with the cleaned
    address; raises :class:`contacts.ContactError` (bad address) or
    :class:`channels.CredentialsError` (credentials file unsafe) before anything is sent.
    """
    address = contacts.check_address(channel, address)
    available = channels.configured(cfg)
    code = contacts.set_contact(conn, username, channel, address, now)
    ids = enqueue_direct(conn, cfg, username, "notify.verify", "Verification code",
                         f"Your code: {code} (appliance notify verify {username} --channel"
                         f" {channel} {code}, or your account page)", [(channel, address)],
                         now)
    deliver(conn, cfg, now, available)
    return {**rows(conn, ids)[0], "address": address}


def set_contacts(conn: sqlite3.Connection, cfg: config.Config, username: str,
                 addresses: dict[str, str | None], now: float, actor: str,
                 source: str) -> list[str]:
    """Each given address (``{"email": …, "sms": …}``) stored and sent its code, audited;
    one line each. Every address is checked first: a bad one changes nothing."""
    wanted = {ch: a for ch, a in addresses.items() if a}
    for channel, address in wanted.items():
        contacts.check_address(channel, address)
    channels.configured(cfg)  # an unsafe credentials file, before anything is stored
    lines = []
    for channel, address in wanted.items():
        row = send_verification(conn, cfg, username, channel, address, now)
        audit.record(conn, actor, "notify.contact", username, source=source,
                     detail={"channel": channel})
        lines.append(describe_sent(row))
    return lines


def describe_sent(row: dict[str, Any]) -> str:
    """One line on a verification code's fate, for a terminal or a page."""
    if row["state"] == "sent":
        return f"{row['channel']} {row['address']}: code sent ({row['answer']})"
    why = row["answer"] or "the channel is not configured"
    return f"{row['channel']} {row['address']}: code waiting in the outbox ({why})"


def rows(conn: sqlite3.Connection, ids: list[int]) -> list[dict[str, Any]]:
    """Outbox rows by id (what `notify test` prints after sending)."""
    return [dict(r) for r in conn.execute(
        f"SELECT id, channel, address, state, attempts, answer FROM notify_outbox WHERE id IN"
        f" ({','.join('?' * len(ids))}) ORDER BY id", ids)]


def status(conn: sqlite3.Connection, cfg: config.Config, now: float) -> dict[str, Any]:
    """Channels with their last success and failure, the outbox by state, open pages."""
    try:
        configured = sorted(channels.configured(cfg))
        problem = ""
    except channels.CredentialsError as e:
        configured, problem = [], str(e)
    out: dict[str, Any] = {"channels": {}, "outbox": {}, "open_pages": 0, "problem": problem}
    for name in sorted(set(configured) | {r[0] for r in conn.execute(
            "SELECT DISTINCT channel FROM notify_outbox")}):
        ok = conn.execute("SELECT MAX(sent_at) FROM notify_outbox WHERE channel = ? AND"
                          " state = 'sent'", (name,)).fetchone()[0]
        bad = conn.execute("SELECT first_failure_at, answer FROM notify_outbox WHERE channel = ?"
                           " AND first_failure_at IS NOT NULL ORDER BY first_failure_at DESC"
                           " LIMIT 1", (name,)).fetchone()
        out["channels"][name] = {"configured": name in configured, "last_success": ok,
                                 "last_failure": bad[0] if bad else None,
                                 "last_error": bad[1] if bad and bad[1] else ""}
    out["outbox"] = dict(conn.execute("SELECT state, COUNT(*) FROM notify_outbox GROUP BY state"
                                      ).fetchall())
    out["open_pages"] = conn.execute("SELECT COUNT(*) FROM notify_pages WHERE acked_at IS NULL"
                                     " AND next_at IS NOT NULL").fetchone()[0]
    out["oldest_waiting"] = conn.execute("SELECT MIN(created_at) FROM notify_outbox WHERE"
                                         " state IN ('pending', 'sending')").fetchone()[0]
    return out


def _webhook_has(conn: sqlite3.Connection, n: dict[str, Any], subject: str,
                 now: float) -> bool:
    """The site webhook posts a notification once, not once per user it went to: the same
    kind and subject within a minute is the same notification to several people."""
    return conn.execute(
        "SELECT 1 FROM notify_outbox o JOIN notify_messages m ON m.id = o.message_id"
        " WHERE o.channel = 'webhook' AND m.kind = ? AND m.subject = ? AND m.created_at >= ?",
        (n["kind"], subject, now - 60)).fetchone() is not None


# -- delivery ------------------------------------------------------------------------------------
def _backoff(cfg: config.Config, attempts: int) -> float:
    n = cfg["notify"]
    return min(float(n["retry_max_s"]), float(n["retry_min_s"]) * 2 ** max(0, attempts - 1))


def _due(conn: sqlite3.Connection, now: float) -> list[sqlite3.Row]:
    """Pending rows whose time has come, and rows a dead or expired sender left 'sending'."""
    rows = conn.execute(
        "SELECT o.*, m.subject, m.body, m.acked_at, m.kind FROM notify_outbox o"
        " JOIN notify_messages m ON m.id = o.message_id"
        " WHERE (o.state = 'pending' AND o.next_attempt_at <= ? AND o.not_before <= ?)"
        " OR o.state = 'sending' ORDER BY o.next_attempt_at LIMIT ?",
        (now, now, BATCH)).fetchall()
    return [r for r in rows if r["state"] == "pending" or _stale(r, now)]


def _stale(row: sqlite3.Row, now: float) -> bool:
    return row["lease_until"] < now or leases.holder_gone(row["lease_owner"])


def _lease(conn: sqlite3.Connection, row: sqlite3.Row, owner: str, now: float) -> bool:
    """Take the row (compare-and-swap on the state and holder we read)."""
    with db.transaction(conn):
        return conn.execute(
            "UPDATE notify_outbox SET state = 'sending', lease_owner = ?, lease_until = ?,"
            " phase = CASE WHEN state = 'pending' THEN '' ELSE phase END,"
            " attempts = attempts + 1 WHERE id = ? AND state = ? AND lease_owner IS ?",
            (owner, now + LEASE_S, row["id"], row["state"], row["lease_owner"])).rowcount == 1


def _committing(conn: sqlite3.Connection, row_id: int, owner: str) -> Callable[[], None]:
    """The mark a channel sets just before the provider may hold the message."""
    def mark() -> None:
        with db.transaction(conn):
            conn.execute("UPDATE notify_outbox SET phase = 'handed' WHERE id = ? AND"
                         " lease_owner = ?", (row_id, owner))
    return mark


def _recover(conn: sqlite3.Connection, row: sqlite3.Row, channel: OutboundChannel,
             owner: str, now: float) -> str | None:
    """A row a dead sender held past the hand-over: found at the provider, or resent where the
    receiver drops duplicates, or (email: handed means held) counted as sent."""
    if row["phase"] != "handed":
        return None  # died before the provider could hold it: send as usual
    if channel.already_sent(row["address"], row["idempotency_key"]):
        _settle(conn, row["id"], owner, "sent", "found at the provider after a restart", now)
        return "sent"
    if channel.resend_safe:
        return None  # the receiver drops the key it has seen
    _settle(conn, row["id"], owner, "sent", "handed over in full before a restart", now)
    return "sent"


def _settle(conn: sqlite3.Connection, row_id: int, owner: str, state: str, answer: str,
            now: float, retry_at: float | None = None) -> None:
    with db.transaction(conn):
        conn.execute(
            "UPDATE notify_outbox SET state = ?, answer = ?, lease_owner = NULL,"
            " lease_until = NULL, sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END,"
            " next_attempt_at = COALESCE(?, next_attempt_at), first_failure_at = CASE WHEN"
            " ? = 'pending' THEN COALESCE(first_failure_at, ?) ELSE first_failure_at END"
            " WHERE id = ? AND lease_owner = ?",
            (state, answer[:500], state, now, retry_at, state, now, row_id, owner))


def _superseded(conn: sqlite3.Connection, row: sqlite3.Row) -> str | None:
    """Why a pending row need not go: acknowledged, or an earlier channel delivered."""
    if row["acked_at"] is not None:
        return "acknowledged"
    if row["rank"] > 0 and row["channel"] != "webhook" and conn.execute(
            "SELECT 1 FROM notify_outbox WHERE message_id = ? AND rank < ? AND state = 'sent'"
            " AND channel != 'webhook' AND sent_at <= ?",
            (row["message_id"], row["rank"], row["not_before"])).fetchone():
        return "delivered by an earlier channel"
    return None


def deliver(conn: sqlite3.Connection, cfg: config.Config, now: float,
            available: dict[str, OutboundChannel], clock: Clock = time.time) -> dict[str, int]:
    """Send every due row once; a channel that fails is not tried again in this pass."""
    owner, down = leases.new_owner(), set()
    counts = {"sent": 0, "failed": 0, "skipped": 0}
    for row in _due(conn, now):
        channel = available.get(row["channel"])
        if channel is None or row["channel"] in down:
            continue
        why = _superseded(conn, row) if row["state"] == "pending" else None
        if why:
            with db.transaction(conn):
                conn.execute("UPDATE notify_outbox SET state = 'skipped', answer = ? WHERE"
                             " id = ? AND state = 'pending'", (why, row["id"]))
            counts["skipped"] += 1
            continue
        if not _lease(conn, row, owner, now):
            continue
        outcome = _recover(conn, row, channel, owner, now) if row["state"] == "sending" \
            else None
        if outcome is not None:
            counts[outcome] += 1
            continue
        outcome = _send(conn, cfg, row, channel, owner, now, clock)
        counts[outcome] += 1
        if outcome == "failed":
            down.add(row["channel"])
    return counts


def _send(conn: sqlite3.Connection, cfg: config.Config, row: sqlite3.Row,
          channel: OutboundChannel, owner: str, now: float, clock: Clock) -> str:
    msg = OutboundMessage(row["idempotency_key"], row["subject"], row["body"],
                          {"kind": row["kind"]})
    started = clock()
    try:
        answer = channel.send(row["address"], msg, _committing(conn, row["id"], owner))
    except DeliveryError as e:
        _settle(conn, row["id"], owner, "pending", str(e), now,
                retry_at=now + _backoff(cfg, row["attempts"] + 1))
        metrics.observe_notification(row["channel"], "failed")
        log.warning("notification not delivered, will retry",
                    extra={"channel": row["channel"], "outbox_id": row["id"], "error": str(e)})
        return "failed"
    _settle(conn, row["id"], owner, "sent", answer, now)
    metrics.observe_notification(row["channel"], "sent", max(0.0, now - row["created_at"]))
    log.info("notification delivered", extra={"channel": row["channel"], "outbox_id": row["id"],
                                              "send_ms": round((clock() - started) * 1000)})
    return "sent"


# -- SMS replies ---------------------------------------------------------------------------------
def read_replies(conn: sqlite3.Connection, available: dict[str, OutboundChannel],
                 now: float) -> int:
    """Each reply in gammu-smsd's inbox is read once, then moved aside."""
    sms = available.get("sms")
    if sms is None:
        return 0
    acked = 0
    for path, sender, text in sms.replies():  # type: ignore[attr-defined]
        acked += acks.acknowledge_sms(conn, sender, text, now)
        sms.done_with(path)  # type: ignore[attr-defined]
    return acked


# -- the sweep -------------------------------------------------------------------------------------
def run_once(conn: sqlite3.Connection, cfg: config.Config, now: float,
             clock: Clock = time.time) -> dict[str, int]:
    """One pass: fan out, ladder, replies, delivery. Safe to repeat or to die part way."""
    available = channels.configured(cfg, clock)
    counts = alerts.check(conn, cfg, now)
    counts["messages"] = fan_out(conn, cfg, now, available)
    counts["unacknowledged"] = acks.escalate_unacknowledged(conn, cfg, now)
    if counts["unacknowledged"]:
        counts["messages"] += fan_out(conn, cfg, now, available)
    counts["sms_acks"] = read_replies(conn, available, now)
    counts.update(deliver(conn, cfg, now, available, clock))
    return counts


_LOCK = threading.Lock()


def sweep(cfg: config.Config, now: float | None = None,
          clock: Clock = time.time) -> dict[str, int] | None:
    """The worker's periodic step (runtime/tasks.py SWEEP_MODULES)."""
    if not _LOCK.acquire(blocking=False):
        return None
    try:
        metrics.ensure_setup(cfg.data_dir)  # counters in the files /metrics merges
        conn = db.connect(cfg.db_path)
        try:
            return run_once(conn, cfg, clock() if now is None else now, clock)
        finally:
            conn.close()
    finally:
        _LOCK.release()
