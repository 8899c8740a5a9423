"""User accounts: roles and argon2id password hashes.

Passwords are never logged, never put on a command line and never stored in
clear; only the argon2id hash is kept.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import sqlite3
import time
from pathlib import Path

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("appliance.accounts")

ROLES = ("admin", "responder", "site_staff", "radiologist", "neurologist")


# argon2id with OWASP's parameters (19 MiB, 2 passes, 1 lane). The library's
# default (64 MiB, 3 passes, 4 lanes) took ~0.7 s per verify on this 2-core box
# under load and 64 MiB per concurrent sign-in; one lane also suits 2 cores.
# Hashes made with other parameters still verify and are upgraded at sign-in.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, type=Type.ID)


class AccountError(Exception):
    pass


def generate_password() -> str:
    """A random password a responder can read out loud: 5 groups of 4."""
    alphabet = "abcdefghjkmnpqrstuvwxyz23456789"
    return "-".join("".join(secrets.choice(alphabet) for _ in range(4)) for _ in range(5))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def needs_rehash(stored_hash: str) -> bool:
    """Whether a hash was made with other parameters than today's (upgrade it at sign-in)."""
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True


def check_password(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def add_user(conn: sqlite3.Connection, username: str, role: str, password: str,
             display_name: str = "", tags: str = "", must_change: bool = False) -> int:
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    if not username or not username.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise AccountError("username must be letters, digits, '.', '-' or '_'")
    if len(password) < 10:
        raise AccountError("password must be at least 10 characters")
    now = time.time()
    try:
        cur = conn.execute(
            "INSERT INTO users (username, display_name, role, password_hash, tags,"
            " must_change_password, created_at, password_changed_at) VALUES (?,?,?,?,?,?,?,?)",
            (username, display_name or username, role, hash_password(password), tags,
             int(must_change), now, now),
        )
    except sqlite3.IntegrityError:
        raise AccountError(f"user {username!r} already exists") from None
    return cur.lastrowid


# -- account administration (CLI and admin pages) ------------------------------------------
def get_user(conn: sqlite3.Connection, username: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
    if row is None:
        raise AccountError(f"no user named {username!r}")
    return row


def list_users(conn: sqlite3.Connection) -> list[dict]:
    """Every account without its secrets (hash and TOTP key are left out)."""
    return [dict(r) for r in conn.execute(
        "SELECT id, username, display_name, role, tags, disabled, must_change_password,"
        " totp_secret IS NOT NULL AS totp_enrolled, created_at, password_changed_at,"
        " last_login_at FROM users ORDER BY username"
    )]


def end_sessions(conn: sqlite3.Connection, user_id: int, reason: str,
                 at: float | None = None) -> int:
    """End every open browser session of a user (disabled, password reset)."""
    return conn.execute(
        "UPDATE sessions SET ended_at = ?, end_reason = ? WHERE user_id = ? AND ended_at IS NULL",
        (time.time() if at is None else at, reason, user_id),
    ).rowcount


# What sign-in leaves behind is kept long enough to investigate an incident
# (the audit log keeps every sign-in and logoff for good) and then deleted, so
# a password-guessing attack cannot grow the database without bound.
ATTEMPTS_KEEP_S = 7 * 86400
SESSIONS_KEEP_S = 30 * 86400
PRUNE_EVERY_S = 3600.0
_last_prune = 0.0


def prune_auth_records(conn: sqlite3.Connection, now: float) -> dict[str, int]:
    """Delete sign-in attempts older than 7 days and sessions over 30 days gone.

    A session counts as gone from when it ended, or, never ended, from when it
    was last seen (idle logoff and the session's maximum age are both far
    shorter). The lockout and rate-limit windows are minutes, so nothing they
    count is deleted.
    """
    attempts = conn.execute("DELETE FROM login_attempts WHERE ts < ?",
                            (now - ATTEMPTS_KEEP_S,)).rowcount
    sessions = conn.execute(
        "DELETE FROM sessions WHERE coalesce(ended_at, last_seen) < ?", (now - SESSIONS_KEEP_S,),
    ).rowcount
    return {"login_attempts": attempts, "sessions": sessions}


def sweep(cfg) -> None:
    """Called by the worker's sweep: prune sign-in records, at most once an hour."""
    global _last_prune
    from appliance.core import db

    now = time.time()
    if now - _last_prune < PRUNE_EVERY_S:
        return
    conn = db.connect(cfg.db_path)
    try:
        with db.transaction(conn):
            pruned = prune_auth_records(conn, now)
    finally:
        conn.close()
    _last_prune = now
    if any(pruned.values()):
        log.info("pruned old sign-in records", extra=pruned)


def set_disabled(conn: sqlite3.Connection, username: str, disabled: bool) -> None:
    """Disable (sessions end at once, tokens stop working) or re-enable an account."""
    row = get_user(conn, username)
    conn.execute("UPDATE users SET disabled = ? WHERE id = ?", (int(disabled), row["id"]))
    if disabled:
        end_sessions(conn, row["id"], "disabled")


def reset_password(conn: sqlite3.Connection, username: str, password: str,
                   must_change: bool = True, reset_totp: bool = False) -> None:
    """Set a new password, end the user's sessions and lift a lockout.

    The lockouts and the account's attempt budget count only what came after
    the last ``reset`` or ``unlock`` row, so the row written here lifts them.
    """
    if len(password) < 10:
        raise AccountError("password must be at least 10 characters")
    row = get_user(conn, username)
    now = time.time()
    conn.execute(
        "UPDATE users SET password_hash = ?, must_change_password = ?, password_changed_at = ?"
        + (", totp_secret = NULL, totp_last_step = NULL" if reset_totp else "") + " WHERE id = ?",
        (hash_password(password), int(must_change), now, row["id"]),
    )
    end_sessions(conn, row["id"], "password reset", now)
    conn.execute("INSERT INTO login_attempts (ts, username, address, ok, reason)"
                 " VALUES (?, ?, 'cli', 1, 'reset')", (now, username))


# -- sign-in limits: lockout per (account, address), the account's budget -------------------
# Rows of login_attempts by reason: a password or code was checked ('ok', 'password',
# 'totp', 'disabled'), the attempt was refused unchecked ('rate', 'locked'), or an admin
# lifted the limits ('reset', 'unlock'). Only checked attempts count against an account,
# so an address that is already refused cannot keep anyone else out.
CHECKED = ("ok", "password", "totp", "disabled")
LIFTED = ("reset", "unlock")
_IN_CHECKED = "reason IN ('ok', 'password', 'totp', 'disabled')"


def _last_lift(conn: sqlite3.Connection, username: str) -> int:
    """Id of the last ``reset``/``unlock`` row of this account (0 if none)."""
    return conn.execute(
        "SELECT max(id) FROM login_attempts WHERE username = ? AND ok = 1"
        " AND reason IN ('reset', 'unlock')", (username,),
    ).fetchone()[0] or 0


def failures_in_a_row(conn: sqlite3.Connection, username: str, address: str,
                      since: float) -> int:
    """Failed passwords or codes for this account from this address since its last success
    there (or an admin's unlock), counted from ``since``.

    The lockout is per address: whoever guesses at ``admin`` locks only themselves out,
    and the real admin signs in from elsewhere. Attempts refused unchecked are not
    counted, so the lock lifts on time however often a locked address knocks.
    """
    last_ok = conn.execute(
        "SELECT max(id) FROM login_attempts WHERE username = ? AND ok = 1"
        " AND (address = ? OR reason IN ('reset', 'unlock'))", (username, address),
    ).fetchone()[0] or 0
    return conn.execute(
        "SELECT count(*) FROM login_attempts WHERE username = ? AND address = ? AND ok = 0"
        " AND id > ? AND ts > ? AND reason IN ('password', 'totp')",
        (username, address, last_ok, since),
    ).fetchone()[0]


def checked_attempts(conn: sqlite3.Connection, username: str, since: float) -> int:
    """Passwords or codes checked for this account since ``since`` (and its last unlock),
    from every address: the account's budget against guessing spread over many addresses.
    """
    return conn.execute(
        "SELECT count(*) FROM login_attempts WHERE username = ? AND ts > ? AND id > ?"
        f" AND {_IN_CHECKED}", (username, since, _last_lift(conn, username)),
    ).fetchone()[0]


def known_address(conn: sqlite3.Connection, username: str, address: str) -> bool:
    """Whether this user signed in from this address before (within the kept attempts):
    such an address is not held back by the account's budget that others used up."""
    return conn.execute(
        "SELECT 1 FROM login_attempts WHERE username = ? AND address = ? AND ok = 1"
        " AND reason = 'ok' LIMIT 1", (username, address),
    ).fetchone() is not None


def locked_addresses(conn: sqlite3.Connection, username: str, now: float,
                     auth: dict) -> list[str]:
    """The addresses this account is locked for now (``auth`` is the site's auth section)."""
    since = now - auth["lockout_min"] * 60
    candidates = [r[0] for r in conn.execute(
        "SELECT DISTINCT address FROM login_attempts WHERE username = ? AND ok = 0"
        " AND ts > ? AND reason IN ('password', 'totp')", (username, since))]
    return [a for a in candidates
            if failures_in_a_row(conn, username, a, since) >= auth["lockout_after_failures"]]


def sign_in_blocks(conn: sqlite3.Connection, username: str, now: float,
                   auth: dict) -> dict:
    """What holds this account back now: ``locked`` (addresses) and ``budget_spent``."""
    used = checked_attempts(conn, username, now - auth["attempt_window_min"] * 60)
    return {"locked": locked_addresses(conn, username, now, auth),
            "budget_spent": used >= auth["attempts_per_account"]}


def unlock(conn: sqlite3.Connection, username: str, by: str, now: float | None = None) -> None:
    """Lift every lockout of an account and refill its attempt budget (an admin's act)."""
    get_user(conn, username)
    conn.execute("INSERT INTO login_attempts (ts, username, address, ok, reason)"
                 " VALUES (?, ?, ?, 1, 'unlock')",
                 (time.time() if now is None else now, username, by[:64]))


def modify_user(conn: sqlite3.Connection, username: str, role: str | None = None,
                tags: str | None = None, display_name: str | None = None) -> dict:
    """Change role, pools/sites (tags) or display name; returns what changed (old, new).

    Sessions read the role on every request, so a change applies at once.
    """
    row = get_user(conn, username)
    if role is not None and role not in ROLES:
        raise AccountError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    changes = {}
    for column, value in (("role", role), ("tags", tags), ("display_name", display_name)):
        if value is not None and value != row[column]:
            conn.execute(f"UPDATE users SET {column} = ? WHERE id = ?", (value, row["id"]))
            changes[column] = [row[column], value]
    return changes


# -- keys and sealed TOTP secrets ----------------------------------------------------------
TOTP_KEY_FILE = "totp.key"
SEALED_PREFIX = "v1:"


def key_file(keys_dir: Path, name: str) -> bytes:
    """A random 32-byte key kept in ``keys/NAME`` (hex, 0600), made on first use.

    Created by linking a complete temp file into place, so two processes (two
    gunicorn workers) starting together agree on one key.
    """
    path = Path(keys_dir) / name
    if not path.exists():
        tmp = path.with_name(f".{name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32).hex().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return bytes.fromhex(path.read_text().strip())


def seal_totp(keys_dir: Path, secret: str, user_id: int) -> str:
    """Encrypt a TOTP key for the database (AES-GCM, key in ``keys/``, bound to the user).

    A copy of appliance.db alone (a support dump, a stolen disk image of the
    database) then does not give away anyone's second factor.
    """
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(key_file(keys_dir, TOTP_KEY_FILE)).encrypt(
        nonce, secret.encode(), str(user_id).encode())
    return SEALED_PREFIX + base64.b64encode(nonce + sealed).decode()


def open_totp(keys_dir: Path, stored: str, user_id: int) -> str:
    """The TOTP key from its stored form (values written before sealing are read as they are)."""
    if not stored.startswith(SEALED_PREFIX):
        return stored
    raw = base64.b64decode(stored[len(SEALED_PREFIX):])
    return AESGCM(key_file(keys_dir, TOTP_KEY_FILE)).decrypt(
        raw[:12], raw[12:], str(user_id).encode()).decode()


# -- what other capabilities read of the accounts tables (they hold no SQL on them) -------------
def public_user(conn: sqlite3.Connection, username: str) -> dict | None:
    """One account without its secrets (id, name, role, tags, disabled); None when unknown."""
    row = conn.execute("SELECT id, username, display_name, role, tags, disabled FROM users"
                       " WHERE username = ?", (username,)).fetchone()
    return dict(row) if row else None


def active_usernames(conn: sqlite3.Connection, roles: tuple[str, ...]) -> list[str]:
    """Enabled accounts holding any of ``roles``, by name (who is told of a finding)."""
    marks = ",".join("?" * len(roles))
    return [r[0] for r in conn.execute(
        f"SELECT username FROM users WHERE role IN ({marks}) AND disabled = 0 ORDER BY username",
        roles)]


def display_name(conn: sqlite3.Connection, username: str) -> str:
    """The name shown for an account (its user name when it has none or is unknown)."""
    r = conn.execute("SELECT display_name FROM users WHERE username = ?", (username,)).fetchone()
    return r[0] if r and r[0] else username
