"""Signed audit chain heads, kept outside the database: the chain's anchor.

Anyone who can write ``appliance.db`` can truncate the audit tail or recompute
the whole chain with fresh hashes, and the chain alone still verifies.  So the
worker periodically signs the head (newest id and hash) with the appliance's
Ed25519 identity key and appends it, fsynced, to ``DATA_DIR/audit-heads/heads.jsonl``;
``appliance audit verify`` then checks the local chain against the newest signed
head: a missing tail or a rewritten row is named.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from appliance.core import durable, identity

HEADS_DIR = "audit-heads"
HEADS_FILE = "heads.jsonl"


def heads_path(data_dir: Path) -> Path:
    return Path(data_dir) / HEADS_DIR / HEADS_FILE


def _message(head: dict[str, Any]) -> bytes:
    return json.dumps({k: head[k] for k in ("id", "hash", "ts", "key_id")}, sort_keys=True,
                      separators=(",", ":")).encode()


def chain_head(conn: sqlite3.Connection) -> tuple[int, str] | None:
    r = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    return (r[0], r[1]) if r else None


def signed_head(conn: sqlite3.Connection, key: ed25519.Ed25519PrivateKey) -> dict[str, Any] | None:
    """The chain's head now, signed (None for an empty trail)."""
    head = chain_head(conn)
    if head is None:
        return None
    d = {"id": head[0], "hash": head[1], "ts": round(time.time(), 3),
         "key_id": identity.key_id(key.public_key())}
    d["signature"] = base64.b64encode(key.sign(_message(d))).decode()
    return d


def read_heads(path: Path) -> list[dict[str, Any]]:
    """Every line of a heads file (unparseable lines are returned as {"bad": line})."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"bad": line})
    return out


def append_head(data_dir: Path, keys_dir: Path, conn: sqlite3.Connection) -> dict | None:
    """Sign the head and append it (fsynced, 0600) unless the newest line already holds it."""
    head = chain_head(conn)
    path = heads_path(data_dir)
    last = (read_heads(path) or [{}])[-1]
    if head is None or (last.get("id"), last.get("hash")) == head:
        return None
    d = signed_head(conn, identity.load_signing_key(keys_dir))
    durable.ensure_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(d, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    durable.fsync_dir(path.parent)
    return d


def check_signature(head: dict[str, Any], public_key: ed25519.Ed25519PublicKey) -> str:
    """'' when ``head`` is signed by ``public_key``, else what is wrong with it."""
    try:
        if head.get("key_id") != identity.key_id(public_key):
            return f"signed by key {head.get('key_id')}, not this appliance's key"
        public_key.verify(base64.b64decode(head["signature"]), _message(head))
    except (KeyError, TypeError, ValueError, InvalidSignature):
        return "signature does not verify (forged or damaged)"
    return ""


def check_chain(conn: sqlite3.Connection, heads: list[dict[str, Any]],
                public_key: ed25519.Ed25519PublicKey) -> tuple[bool, str]:
    """Compare the chain with the newest signed head; name truncation, rewrite or forgery."""
    if not heads:
        return True, "no signed head yet"
    newest = heads[-1]
    problem = check_signature(newest, public_key)
    if problem:
        return False, f"signed heads file is not trustworthy: newest head {problem}"
    row = conn.execute("SELECT hash FROM audit WHERE id=?", (newest["id"],)).fetchone()
    if row is None:
        top = conn.execute("SELECT MAX(id) FROM audit").fetchone()[0] or 0
        return False, f"rows after id {top} are missing (the signed head is row {newest['id']})"
    if row[0] != newest["hash"]:
        return False, f"row {newest['id']} differs from the signed head (the chain was rewritten)"
    return True, f"matches the signed head at row {newest['id']}"


def sweep(cfg: Any) -> None:
    """Worker sweep step: sign the chain head when it moved since the last signed one."""
    from appliance.core import db

    conn = db.connect(cfg.db_path)
    try:
        append_head(cfg.data_dir, cfg.keys_dir, conn)
    finally:
        conn.close()
