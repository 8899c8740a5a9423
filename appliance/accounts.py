"""User accounts: roles and argon2id password hashes.

Passwords are never logged, never put on a command line and never stored in
clear; only the argon2id hash is kept.
"""

from __future__ import annotations

import secrets
import sqlite3
import time

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ROLES = ("admin", "responder", "site_staff", "radiologist", "neurologist")

SCHEMA = """
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL DEFAULT '',
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    totp_secret TEXT,
    tags TEXT NOT NULL DEFAULT '',
    disabled INTEGER NOT NULL DEFAULT 0,
    must_change_password INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    password_changed_at REAL NOT NULL
);
"""

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters


class AccountError(Exception):
    pass


def generate_password() -> str:
    """A random password a responder can read out loud: 5 groups of 4."""
    alphabet = "abcdefghjkmnpqrstuvwxyz23456789"
    return "-".join("".join(secrets.choice(alphabet) for _ in range(4)) for _ in range(5))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


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
