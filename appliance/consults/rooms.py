"""Teleneurology consults: rooms, invite links, participants, signaling, chat, call records.

Media runs browser to browser; this module holds everything around it, in
SQLite, because the web app is several gunicorn processes that share no
memory: a signaling message, a chat line or a ladder step is a row in
``consult_events`` and every participant's event stream reads the rows after
its cursor (the row id), so a reconnecting stream resumes where it stopped
and a message posted to one worker reaches a stream served by another.

Secrets: the invite-link key and the TURN REST API shared secret are
generated into ``keys/`` (0600) on first use. An invite link carries only a
signed token naming one consult, a nonce and an expiry; a guest gets a random
participant secret kept in their session cookie, stored here only hashed.
TURN credentials follow coturn's REST API: the username is
``expiry:consult-N`` and the password base64(HMAC-SHA1(secret, username)), so
coturn checks them without asking us and they lapse by themselves.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

from appliance.accounts import users as accounts
from appliance.accounts.roles import CONSULT_HOSTS
from appliance.core import audit
from appliance.core.db import transaction
from appliance.health import series as health_series

INVITE_KEY_FILE = "consult-invite.key"
TURN_SECRET_FILE = "turn-secret.key"
MAX_CHAT_CHARS = 2000
MAX_SIGNAL_BYTES = 64_000
EVENT_KINDS = ("signal", "chat", "ladder", "presence", "system")
# Ladder steps a client reports; "video" is the healthy state.
LADDER_STEPS = ("video", "audio_only", "ice_restart", "fresh_pc", "chat_only", "dropped")
JOIN_SLO_MS = 5000
HOST_ROLES = CONSULT_HOSTS  # defined with the other role groups in accounts.roles


class ConsultError(Exception):
    """Bad input or a refused action; the message is shown to the caller as is."""


# -- keys ---------------------------------------------------------------------------------------
def load_key(keys_dir: Path, name: str) -> bytes:
    """A 32-byte random key in ``keys/NAME`` (0600), created once, as its hex text.

    The hex text itself is the HMAC key of invite links and coturn's shared
    secret (coturn reads text), so callers get the ASCII form.
    """
    return accounts.key_file(keys_dir, name).hex().encode("ascii")


def turn_secret(keys_dir: Path) -> str:
    """The TURN REST API shared secret (coturn's ``static-auth-secret``)."""
    return load_key(keys_dir, TURN_SECRET_FILE).decode("ascii")


# -- TURN credentials -----------------------------------------------------------------------------
def turn_credentials(secret: str, consult_id: int, ttl_s: float,
                     now: float | None = None) -> tuple[str, str]:
    """(username, password) valid until ``now + ttl_s`` for one consult."""
    expiry = int((now if now is not None else time.time()) + ttl_s)
    username = f"{expiry}:consult-{consult_id}"
    digest = hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def ice_servers(cfg: Any, host: str, consult_id: int, now: float | None = None) -> list[dict]:
    """The RTCPeerConnection ``iceServers`` for a participant: our coturn as STUN and TURN.

    ``host`` is the name the browser used to reach us unless ``consults.turn_host``
    says otherwise; TURN over UDP and TCP (sites that block UDP).
    """
    c = cfg["consults"]
    name = c["turn_host"] or host
    if ":" in name and not name.startswith("["):
        name = f"[{name}]"  # an IPv6 literal
    port = c["turn_port"]
    user, password = turn_credentials(turn_secret(cfg.keys_dir), consult_id,
                                      c["credential_minutes"] * 60, now)
    return [
        {"urls": [f"stun:{name}:{port}"]},
        {"urls": [f"turn:{name}:{port}?transport=udp", f"turn:{name}:{port}?transport=tcp"],
         "username": user, "credential": password},
    ]


# -- invite links ------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_invite(conn: sqlite3.Connection, key: bytes, consult_id: int, actor: str,
                ttl_s: float, now: float | None = None, source: str = "") -> str:
    """A signed token for one consult that expires; the nonce is kept so it can be revoked."""
    t = now if now is not None else time.time()
    row = get_consult(conn, consult_id)
    if row["ended_at"] is not None:
        raise ConsultError("this consult has ended")
    nonce = secrets.token_urlsafe(12)
    payload = _b64(json.dumps({"c": consult_id, "n": nonce, "e": int(t + ttl_s)},
                              separators=(",", ":")).encode())
    sig = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    with transaction(conn):
        conn.execute("INSERT INTO consult_invites (nonce, consult_id, created_by, created_at,"
                     " expires_at) VALUES (?,?,?,?,?)",
                     (nonce, consult_id, actor, t, t + ttl_s))
        audit.record(conn, actor, "consult.invite", _audit_obj(row), source=source,
                     detail={"consult": consult_id, "expires_at": int(t + ttl_s)}, ts=t)
    return f"{payload}.{sig}"


def check_invite(conn: sqlite3.Connection, key: bytes, token: str,
                 now: float | None = None) -> tuple[int, str]:
    """(consult id, nonce) of a valid invite token, or ConsultError saying why not."""
    t = now if now is not None else time.time()
    try:
        payload, sig = token.split(".")
        expected = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
        ok = hmac.compare_digest(sig.encode(), expected.encode())
        claims = json.loads(_unb64(payload)) if ok else None
    except (ValueError, UnicodeError):
        raise ConsultError("this invite link is damaged: ask for a new one") from None
    if not ok or not isinstance(claims, dict):
        raise ConsultError("this invite link is not valid: ask for a new one")
    if claims.get("e", 0) < t:
        raise ConsultError("this invite link has expired: ask the bedside team for a new one")
    row = conn.execute("SELECT i.revoked_at, c.ended_at FROM consult_invites i JOIN consults c"
                       " ON c.id = i.consult_id WHERE i.nonce = ? AND i.consult_id = ?",
                       (claims.get("n"), claims.get("c"))).fetchone()
    if row is None or row["revoked_at"] is not None:
        raise ConsultError("this invite link was withdrawn: ask for a new one")
    if row["ended_at"] is not None:
        raise ConsultError("this consult has ended")
    return int(claims["c"]), str(claims["n"])


# -- rooms --------------------------------------------------------------------------------------------
def _audit_obj(consult: sqlite3.Row) -> str:
    return consult["study_uid"] or f"consult:{consult['id']}"


def get_consult(conn: sqlite3.Connection, consult_id: int) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM consults WHERE id = ?", (consult_id,)).fetchone()
    if row is None:
        raise ConsultError(f"no consult {consult_id}")
    return row


def create_consult(conn: sqlite3.Connection, actor: str, study_uid: str = "", title: str = "",
                   now: float | None = None, source: str = "") -> int:
    """Open a consult, from a study (it must be on this appliance) or from scratch."""
    t = now if now is not None else time.time()
    study_uid, title = (study_uid or "").strip(), " ".join((title or "").split())[:200]
    if study_uid and conn.execute("SELECT 1 FROM studies WHERE study_uid = ?",
                                  (study_uid,)).fetchone() is None:
        raise ConsultError(f"no study {study_uid} on this appliance")
    if study_uid and not title:
        row = conn.execute("SELECT patient_name, study_description FROM studies"
                           " WHERE study_uid = ?", (study_uid,)).fetchone()
        title = " · ".join(x for x in (row["study_description"], row["patient_name"]) if x)
    with transaction(conn):
        cid = conn.execute("INSERT INTO consults (study_uid, title, created_by, created_at)"
                           " VALUES (?,?,?,?)", (study_uid, title or "Consult", actor, t)).lastrowid
        audit.record(conn, actor, "consult.create", study_uid or f"consult:{cid}", source=source,
                     detail={"consult": cid}, ts=t)
    return cid


def open_consults(conn: sqlite3.Connection, limit: int = 50) -> list[dict]:
    rows = conn.execute(
        "SELECT c.*, (SELECT count(*) FROM consult_participants p WHERE p.consult_id = c.id"
        " AND p.state = 'admitted') AS present, (SELECT count(*) FROM consult_participants p"
        " WHERE p.consult_id = c.id AND p.state = 'lobby') AS waiting FROM consults c"
        " WHERE c.ended_at IS NULL ORDER BY c.id DESC LIMIT ?", (limit,))
    return [dict(r) for r in rows]


def end_consult(conn: sqlite3.Connection, consult_id: int, actor: str,
                now: float | None = None, source: str = "") -> None:
    t = now if now is not None else time.time()
    row = get_consult(conn, consult_id)
    with transaction(conn):
        if conn.execute("UPDATE consults SET ended_at = ? WHERE id = ? AND ended_at IS NULL",
                        (t, consult_id)).rowcount:
            conn.execute("UPDATE consult_participants SET state = 'left', left_at = ?"
                         " WHERE consult_id = ? AND state IN ('lobby', 'admitted')",
                         (t, consult_id))
            post_event(conn, consult_id, None, "system", {"ended": True, "by": actor}, now=t)
            health_series.observe(conn, "call_drop", 0.0, not was_dropped(conn, consult_id),
                                  ts=t)
            audit.record(conn, actor, "consult.end", _audit_obj(row), source=source,
                         detail={"consult": consult_id}, ts=t)


def was_dropped(conn: sqlite3.Connection, consult_id: int) -> bool:
    """A call counts as dropped only when a client reported losing every channel (30 s)."""
    return conn.execute("SELECT 1 FROM consult_events WHERE consult_id = ? AND kind = 'ladder'"
                        " AND body LIKE '%\"dropped\"%' LIMIT 1",
                        (consult_id,)).fetchone() is not None


# -- participants ---------------------------------------------------------------------------------------
def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def participant(conn: sqlite3.Connection, pid: int) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM consult_participants WHERE id = ?", (pid,)).fetchone()


def guest_by_secret(conn: sqlite3.Connection, consult_id: int, secret: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM consult_participants WHERE secret_hash = ?"
                        " AND consult_id = ?", (hash_secret(secret), consult_id)).fetchone()


def user_participant(conn: sqlite3.Connection, consult_id: int, user_id: int) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM consult_participants WHERE consult_id = ? AND user_id = ?"
                        " AND kind = 'user' ORDER BY id DESC LIMIT 1",
                        (consult_id, user_id)).fetchone()


def roster(conn: sqlite3.Connection, consult_id: int) -> list[dict]:
    """Everyone in the room or its lobby (id, name, role, kind, state)."""
    return [dict(r) for r in conn.execute(
        "SELECT id, name, role, kind, state FROM consult_participants WHERE consult_id = ?"
        " AND state IN ('lobby', 'admitted') ORDER BY id", (consult_id,))]


def _announce(conn: sqlite3.Connection, consult_id: int, t: float) -> None:
    post_event(conn, consult_id, None, "presence", {"roster": roster(conn, consult_id)}, now=t)


def join_user(conn: sqlite3.Connection, consult_id: int, user: dict[str, Any],
              now: float | None = None, source: str = "") -> int:
    """A signed-in member of staff or reader enters the room at once (audited)."""
    t = now if now is not None else time.time()
    row = get_consult(conn, consult_id)
    if row["ended_at"] is not None:
        raise ConsultError("this consult has ended")
    with transaction(conn):
        existing = user_participant(conn, consult_id, user["id"])
        if existing is not None and existing["removed_at"] is not None:
            raise ConsultError(f"{existing['removed_by']} removed you from this consult")
        if existing is not None and existing["state"] == "admitted":
            # A new page (reload, second tab) takes the seat: a late "leave" from the
            # old page names the old admitted_at and is ignored (see leave()).
            conn.execute("UPDATE consult_participants SET admitted_at = ? WHERE id = ?",
                         (max(t, existing["admitted_at"] + 1e-3), existing["id"]))
            return existing["id"]
        pid = conn.execute(
            "INSERT INTO consult_participants (consult_id, kind, user_id, name, role, state,"
            " created_at, admitted_at, admitted_by) VALUES (?,?,?,?,?,?,?,?,?)",
            (consult_id, "user", user["id"], user.get("display_name") or user["username"],
             user["role"], "admitted", t, t, user["username"])).lastrowid
        audit.record(conn, user["username"], "consult.join", _audit_obj(row), source=source,
                     detail={"consult": consult_id, "participant": pid}, ts=t)
        _announce(conn, consult_id, t)
    return pid


def join_guest(conn: sqlite3.Connection, consult_id: int, name: str, nonce: str,
               now: float | None = None, source: str = "") -> tuple[int, str]:
    """A guest from an invite link waits in the lobby; returns (participant id, secret)."""
    t = now if now is not None else time.time()
    name = " ".join((name or "").split())
    if not 2 <= len(name) <= 80:
        raise ConsultError("type your name (2 to 80 characters) so the team knows who is joining")
    row = get_consult(conn, consult_id)
    secret = secrets.token_urlsafe(32)
    with transaction(conn):
        pid = conn.execute(
            "INSERT INTO consult_participants (consult_id, kind, name, role, secret_hash,"
            " invite_nonce, state, created_at) VALUES (?,?,?,?,?,?,?,?)",
            (consult_id, "guest", name, "guest", hash_secret(secret), nonce, "lobby",
             t)).lastrowid
        audit.record(conn, f"guest:{name}", "consult.lobby", _audit_obj(row), source=source,
                     detail={"consult": consult_id, "participant": pid}, ts=t)
        _announce(conn, consult_id, t)
    return pid, secret


def rejoin_guest(conn: sqlite3.Connection, consult_id: int, guest: sqlite3.Row,
                 now: float | None = None) -> sqlite3.Row:
    """A guest who was admitted and left (reload, network) comes back without the lobby."""
    t = now if now is not None else time.time()
    if guest["state"] == "admitted":  # a reload: the new page takes the seat
        with transaction(conn):
            conn.execute("UPDATE consult_participants SET admitted_at = ? WHERE id = ?",
                         (max(t, guest["admitted_at"] + 1e-3), guest["id"]))
        return participant(conn, guest["id"])
    if guest["state"] != "left" or guest["admitted_at"] is None or _revoked(conn, guest):
        return guest
    if get_consult(conn, consult_id)["ended_at"] is not None:
        raise ConsultError("this consult has ended")
    with transaction(conn):
        conn.execute("UPDATE consult_participants SET state = 'admitted', left_at = NULL,"
                     " admitted_at = ? WHERE id = ? AND state = 'left'",
                     (max(t, guest["admitted_at"] + 1e-3), guest["id"]))
        _announce(conn, consult_id, t)
    return participant(conn, guest["id"])


def join_media(conn: sqlite3.Connection, consult_id: int, purpose: str,
               now: float | None = None) -> int:
    """The appliance's own receive-only participant (probe or recorder); audited."""
    t = now if now is not None else time.time()
    row = get_consult(conn, consult_id)
    if row["ended_at"] is not None:
        raise ConsultError("this consult has ended")
    if purpose == "recorder" and not row["recording_consent_by"]:
        raise ConsultError("recording needs consent first (recorded in the consult page)")
    with transaction(conn):
        pid = conn.execute(
            "INSERT INTO consult_participants (consult_id, kind, name, role, state, created_at,"
            " admitted_at, admitted_by) VALUES (?,?,?,?,?,?,?,?)",
            (consult_id, "media", f"appliance {purpose}", purpose, "admitted", t, t,
             "appliance")).lastrowid
        audit.record(conn, "appliance-media", f"consult.{purpose}", _audit_obj(row),
                     detail={"consult": consult_id, "participant": pid}, ts=t)
        _announce(conn, consult_id, t)
    return pid


def admit(conn: sqlite3.Connection, consult_id: int, pid: int, actor: str, allow: bool = True,
          now: float | None = None, source: str = "") -> None:
    """Let a guest in from the lobby (or turn them away); audited either way."""
    t = now if now is not None else time.time()
    row = get_consult(conn, consult_id)
    with transaction(conn):
        guest = participant(conn, pid)
        if guest is None or guest["consult_id"] != consult_id:
            raise ConsultError(f"no participant {pid} in this consult")
        if guest["state"] != "lobby":
            raise ConsultError(f"{guest['name']} is not waiting in the lobby")
        if allow and _revoked(conn, guest):
            raise ConsultError(f"the link {guest['name']} came by was withdrawn")
        conn.execute("UPDATE consult_participants SET state = ?, admitted_at = ?, admitted_by = ?"
                     " WHERE id = ?", ("admitted" if allow else "denied", t, actor, pid))
        audit.record(conn, actor, "consult.admit" if allow else "consult.deny", _audit_obj(row),
                     source=source, detail={"consult": consult_id, "participant": pid,
                                            "guest": guest["name"]}, ts=t)
        _announce(conn, consult_id, t)


def leave(conn: sqlite3.Connection, consult_id: int, pid: int, now: float | None = None,
          seat: float | None = None) -> bool:
    """Leave the consult. ``seat`` (the admitted_at the page joined with) makes a late leave
    from a page already replaced by a reload a no-op; returns whether anyone left."""
    t = now if now is not None else time.time()
    with transaction(conn):
        row = participant(conn, pid)
        if row is None or (seat is not None and row["admitted_at"] is not None
                           and row["admitted_at"] != seat):
            return False
        if conn.execute("UPDATE consult_participants SET state = 'left', left_at = ? WHERE id = ?"
                        " AND consult_id = ? AND state IN ('lobby', 'admitted')",
                        (t, pid, consult_id)).rowcount:
            _announce(conn, consult_id, t)
            return True
    return False


def _revoked(conn: sqlite3.Connection, guest: sqlite3.Row) -> bool:
    """Whether the invite link a guest came by was withdrawn (it admits nobody again)."""
    return guest["invite_nonce"] is not None and conn.execute(
        "SELECT 1 FROM consult_invites WHERE nonce = ? AND revoked_at IS NOT NULL",
        (guest["invite_nonce"],)).fetchone() is not None


def remove(conn: sqlite3.Connection, consult_id: int, pid: int, actor: str,
           now: float | None = None, source: str = "") -> None:
    """A host takes someone out of the consult: their secret (or account) no longer gets
    them in, their event stream ends, no TURN credentials are issued to them; audited."""
    t = now if now is not None else time.time()
    row = get_consult(conn, consult_id)
    with transaction(conn):
        who = participant(conn, pid)
        if who is None or who["consult_id"] != consult_id:
            raise ConsultError(f"no participant {pid} in this consult")
        if who["kind"] == "media":
            raise ConsultError("the appliance's own participant leaves by itself")
        if who["removed_at"] is not None:
            raise ConsultError(f"{who['name']} was already removed")
        conn.execute("UPDATE consult_participants SET state = 'denied', left_at = ?,"
                     " removed_at = ?, removed_by = ? WHERE id = ?", (t, t, actor, pid))
        audit.record(conn, actor, "consult.remove", _audit_obj(row), source=source,
                     detail={"consult": consult_id, "participant": pid,
                             "name": who["name"]}, ts=t)
        _announce(conn, consult_id, t)


def revoke_invites(conn: sqlite3.Connection, consult_id: int, actor: str,
                   now: float | None = None, source: str = "") -> int:
    """Withdraw every invite link of a consult: they admit nobody any more, guests waiting
    in the lobby from them are turned away, and guests in the call from them stay until they
    leave (then cannot come back by them). Returns the number of links withdrawn; audited."""
    t = now if now is not None else time.time()
    row = get_consult(conn, consult_id)
    with transaction(conn):
        n = conn.execute("UPDATE consult_invites SET revoked_at = ? WHERE consult_id = ?"
                         " AND revoked_at IS NULL", (t, consult_id)).rowcount
        conn.execute("UPDATE consult_participants SET state = 'denied', left_at = ?"
                     " WHERE consult_id = ? AND state = 'lobby' AND invite_nonce IN"
                     " (SELECT nonce FROM consult_invites WHERE consult_id = ?"
                     " AND revoked_at IS NOT NULL)", (t, consult_id, consult_id))
        audit.record(conn, actor, "consult.invite_revoke", _audit_obj(row), source=source,
                     detail={"consult": consult_id, "links": n}, ts=t)
        _announce(conn, consult_id, t)
    return n


def record_consent(conn: sqlite3.Connection, consult_id: int, actor: str,
                   now: float | None = None, source: str = "") -> None:
    """Consent to record, captured in the UI by a member of staff; audited."""
    t = now if now is not None else time.time()
    row = get_consult(conn, consult_id)
    with transaction(conn):
        conn.execute("UPDATE consults SET recording_consent_by = ? WHERE id = ?",
                     (actor, consult_id))
        audit.record(conn, actor, "consult.recording_consent", _audit_obj(row), source=source,
                     detail={"consult": consult_id}, ts=t)


# -- events: signaling, chat, ladder --------------------------------------------------------------------
def post_event(conn: sqlite3.Connection, consult_id: int, sender: int | None, kind: str,
               body: dict[str, Any], recipient: int | None = None,
               now: float | None = None) -> int:
    """Append one event; every stream of the consult (in any process) picks it up."""
    if kind not in EVENT_KINDS:
        raise ConsultError(f"unknown event kind {kind!r}")
    text = json.dumps(body, separators=(",", ":"))
    if len(text) > MAX_SIGNAL_BYTES:
        raise ConsultError("message too large")
    return conn.execute(
        "INSERT INTO consult_events (consult_id, ts, sender, recipient, kind, body)"
        " VALUES (?,?,?,?,?,?)",
        (consult_id, now if now is not None else time.time(), sender, recipient, kind,
         text)).lastrowid


def signal(conn: sqlite3.Connection, consult_id: int, sender: sqlite3.Row, to: int,
           data: dict[str, Any]) -> int:
    """Relay an offer/answer/candidate to one admitted participant of the same consult."""
    if sender["state"] != "admitted":
        raise ConsultError("wait until you are admitted")
    target = participant(conn, to)
    if target is None or target["consult_id"] != consult_id or target["state"] != "admitted":
        raise ConsultError(f"participant {to} is not in this consult")
    if not isinstance(data, dict):
        raise ConsultError("signal data must be an object")
    return post_event(conn, consult_id, sender["id"], "signal", data, recipient=to)


def post_chat(conn: sqlite3.Connection, consult_id: int, sender: sqlite3.Row, text: str,
              actor: str, now: float | None = None, source: str = "") -> int:
    """A chat line: stored with the consult (so with its study) and audited."""
    t = now if now is not None else time.time()
    text = (text or "").strip()
    if not text:
        raise ConsultError("empty message")
    if len(text) > MAX_CHAT_CHARS:
        raise ConsultError(f"message longer than {MAX_CHAT_CHARS} characters")
    if sender["state"] != "admitted":
        raise ConsultError("wait until you are admitted")
    row = get_consult(conn, consult_id)
    if row["ended_at"] is not None:
        raise ConsultError("this consult has ended")
    with transaction(conn):
        eid = post_event(conn, consult_id, sender["id"], "chat",
                         {"text": text, "name": sender["name"], "sent_at": t}, now=t)
        audit.record(conn, actor, "consult.chat", _audit_obj(row), source=source,
                     detail={"consult": consult_id, "event": eid, "chars": len(text)}, ts=t)
    return eid


def events_after(conn: sqlite3.Connection, consult_id: int, who: sqlite3.Row, after: int,
                 limit: int = 200) -> list[dict]:
    """Events for one participant after a cursor: a lobby guest sees only presence."""
    if who["state"] == "admitted":
        sql = ("SELECT * FROM consult_events WHERE consult_id = ? AND id > ? AND"
               " (recipient IS NULL OR recipient = ?) AND NOT (kind = 'signal' AND sender = ?)"
               " ORDER BY id LIMIT ?")
        args: tuple = (consult_id, after, who["id"], who["id"], limit)
    else:
        sql = ("SELECT * FROM consult_events WHERE consult_id = ? AND id > ? AND"
               " kind IN ('presence', 'system') ORDER BY id LIMIT ?")
        args = (consult_id, after, limit)
    return [{"id": r["id"], "ts": r["ts"], "sender": r["sender"], "kind": r["kind"],
             "body": json.loads(r["body"])} for r in conn.execute(sql, args)]


def cursor(conn: sqlite3.Connection, consult_id: int) -> int:
    """The newest event id: a page that joins now streams only what comes after it."""
    return conn.execute("SELECT coalesce(max(id), 0) FROM consult_events WHERE consult_id = ?",
                        (consult_id,)).fetchone()[0]


def chat_log(conn: sqlite3.Connection, consult_id: int) -> list[dict]:
    return [dict(json.loads(r["body"]), id=r["id"], sender=r["sender"]) for r in conn.execute(
        "SELECT id, sender, body FROM consult_events WHERE consult_id = ? AND kind = 'chat'"
        " ORDER BY id", (consult_id,))]


def chat_for_study(conn: sqlite3.Connection, study_uid: str) -> list[dict]:
    """Every consult chat line attached to a study (for the study's record)."""
    out = []
    for c in conn.execute("SELECT id FROM consults WHERE study_uid = ? ORDER BY id",
                          (study_uid,)):
        out += [dict(m, consult=c["id"]) for m in chat_log(conn, c["id"])]
    return out


# -- call records ------------------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def record_stats(conn: sqlite3.Connection, consult_id: int, pid: int, samples: list[dict]) -> int:
    """getStats samples (loss, jitter, RTT, fps, bitrate, ladder step) posted by a client."""
    if not isinstance(samples, list) or len(samples) > 120:
        raise ConsultError("samples must be a list of at most 120 objects")
    rows = []
    for s in samples:
        if not isinstance(s, dict) or _num(s.get("ts")) is None:
            raise ConsultError("each sample needs a numeric ts")
        step = s.get("step", "")
        rows.append((consult_id, pid, _num(s["ts"]), _num(s.get("loss")), _num(s.get("jitter_ms")),
                     _num(s.get("rtt_ms")), _num(s.get("fps")), _num(s.get("kbit_s")),
                     step if step in LADDER_STEPS else ""))
    with transaction(conn):
        conn.executemany("INSERT INTO consult_stats (consult_id, participant_id, ts, loss,"
                         " jitter_ms, rtt_ms, fps, kbit_s, step) VALUES (?,?,?,?,?,?,?,?,?)", rows)
    return len(rows)


def record_ladder(conn: sqlite3.Connection, consult_id: int, sender: sqlite3.Row,
                  body: dict[str, Any], now: float | None = None) -> int:
    """A ladder step (or the join time) reported by a client; shown to the other side too."""
    step = body.get("step")
    if step not in LADDER_STEPS and step != "joined":
        raise ConsultError(f"unknown ladder step {step!r} (one of {', '.join(LADDER_STEPS)})")
    clean = {"step": step, "name": sender["name"]}
    for key in ("join_ms", "after_ms", "peer", "gen"):
        if _num(body.get(key)) is not None:
            clean[key] = _num(body[key])
    with transaction(conn):
        eid = post_event(conn, consult_id, sender["id"], "ladder", clean, now=now)
        if step == "joined" and "join_ms" in clean:  # the SLO: video join under 5 s
            health_series.observe(conn, "video_join", clean["join_ms"] / 1000,
                                  clean["join_ms"] < JOIN_SLO_MS, ts=now)
    return eid


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))]


def call_summary(conn: sqlite3.Connection, since: float = 0.0) -> dict[str, Any]:
    """Join time p50/p95 and the share of sampled time spent degraded, over consults since."""
    joins = [json.loads(r["body"]).get("join_ms") for r in conn.execute(
        "SELECT body FROM consult_events WHERE kind = 'ladder' AND ts >= ?"
        " AND body LIKE '%\"joined\"%'", (since,))]
    joins = [j for j in joins if isinstance(j, (int, float))]
    steps = [r["step"] for r in conn.execute("SELECT step FROM consult_stats WHERE ts >= ?",
                                             (since,))]
    degraded = sum(1 for s in steps if s and s != "video")
    dropped = conn.execute("SELECT count(DISTINCT consult_id) FROM consult_events WHERE"
                           " kind = 'ladder' AND ts >= ? AND body LIKE '%\"dropped\"%'",
                           (since,)).fetchone()[0]
    calls = conn.execute("SELECT count(*) FROM consults WHERE created_at >= ?",
                         (since,)).fetchone()[0]
    return {"joins": len(joins), "join_ms_p50": _percentile(joins, 0.5),
            "join_ms_p95": _percentile(joins, 0.95),
            "join_ms_mean": statistics.fmean(joins) if joins else None,
            "degraded_share": degraded / len(steps) if steps else 0.0,
            "calls": calls, "drop_rate": dropped / calls if calls else 0.0}


# -- what the media service asks of the rooms (it holds no SQL on the consult tables) -----------
def needing_probe(conn: sqlite3.Connection) -> list[int]:
    """Open consults with a browser in them and no media participant (an SLO probe is due)."""
    return [r[0] for r in conn.execute(
        "SELECT c.id FROM consults c WHERE c.ended_at IS NULL AND EXISTS (SELECT 1 FROM"
        " consult_participants p WHERE p.consult_id = c.id AND p.state = 'admitted'"
        " AND p.kind != 'media') AND NOT EXISTS (SELECT 1 FROM consult_participants p"
        " WHERE p.consult_id = c.id AND p.state = 'admitted' AND p.kind = 'media')").fetchall()]


def is_open(conn: sqlite3.Connection, consult_id: int) -> bool:
    """Whether the consult exists and has not ended."""
    row = conn.execute("SELECT ended_at FROM consults WHERE id = ?", (consult_id,)).fetchone()
    return row is not None and row["ended_at"] is None
