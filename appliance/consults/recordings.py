"""Consult recordings at rest: sealing (age), the ``consult_recordings`` index, crash recovery.

``appliance media`` writes each remote participant's audio and video to a
clear 0600 file under ``recordings/.partial/`` (aiortc's recorder needs a
file it can seek in) and seals it when the recording ends: encrypted with age
to ``sync.recipients`` (the keys every bundle is encrypted to) into
``recordings/NAME.mkv.age`` (temp + fsync + rename + fsync dir), then the clear
file is removed and the sealed file indexed here. Sealed files are carried by
sync bundles as they are (still encrypted) and put back by ``appliance restore``.

After a crash (kill -9 mid-recording) :func:`recover` runs before the media
service takes any work: a non-empty clear part is **sealed** and indexed as
incomplete (``complete = 0``; what was recorded up to the crash stays playable,
which is what a stroke team reviewing the call wants), an empty one is
discarded, and a half-written sealed temp file is removed and sealed again
from its clear source. So no clear media outlives the next start.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from appliance.core import durable
from appliance.core.db import transaction

NAME_RE = re.compile(r"^consult-(?P<cid>[0-9]+)-[A-Za-z0-9._-]+\.mkv\.age$")
TMP_PREFIX = "."
TMP_SUFFIX = ".sealing"


def directory(data_dir: Path) -> Path:
    return Path(data_dir) / "recordings"


def partial_dir(data_dir: Path) -> Path:
    """Where clear parts live while a call is recorded (0700; files 0600)."""
    path = directory(data_dir) / ".partial"
    path.mkdir(parents=True, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def partial_path(data_dir: Path, consult_id: int, job_id: int, sender: int, gen: int) -> Path:
    """A fresh clear part's path: unique per job run, sender and peer-connection generation."""
    stamp = f"{time.time():.3f}".replace(".", "")
    name = f"consult-{consult_id}-j{job_id}-t{stamp}-p{sender}-g{gen}.mkv"
    path = partial_dir(data_dir) / name
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return path


def sha256_file(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def seal_file(clear: Path, recipients: list) -> Path:
    """Encrypt one clear part to the recipients beside ``recordings/``; remove the clear file.

    Idempotent: if the sealed file is already in place (a crash between the
    rename and the unlink), only the clear file is removed.
    """
    import pyrage

    out_dir = clear.parent.parent
    target = out_dir / (clear.name + ".age")
    if not target.exists():
        tmp = out_dir / f"{TMP_PREFIX}{target.name}{TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as dst, open(clear, "rb") as src:
            pyrage.encrypt_io(src, dst, recipients)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
        durable.fsync_dir(out_dir)
    clear.unlink()
    durable.fsync_dir(clear.parent)
    return target


def register(conn: sqlite3.Connection, sealed: Path, complete: bool = True,
             origin: str = "local", now: float | None = None,
             meta: dict[str, Any] | None = None) -> int:
    """Index a sealed recording (once: the name is unique); returns its row id."""
    match = NAME_RE.match(sealed.name)
    if not match:
        raise ValueError(f"not a recording name: {sealed.name}")
    cid = int(match["cid"])
    digest, size = sha256_file(sealed)
    meta = meta or {}
    study = meta.get("study_uid")
    if study is None:
        row = conn.execute("SELECT study_uid FROM consults WHERE id = ?", (cid,)).fetchone()
        study = row["study_uid"] if row else ""
    with transaction(conn):
        conn.execute(
            "INSERT OR IGNORE INTO consult_recordings (consult_id, study_uid, name, sha256, size,"
            " sealed_at, complete, origin) VALUES (?,?,?,?,?,?,?,?)",
            (cid, study, sealed.name, digest, size,
             meta.get("sealed_at", now if now is not None else time.time()),
             int(meta.get("complete", complete)), origin))
        return conn.execute("SELECT id FROM consult_recordings WHERE name = ?",
                            (sealed.name,)).fetchone()[0]


def recover(conn: sqlite3.Connection, data_dir: Path, recipients: list) -> dict[str, list[str]]:
    """Seal what a killed recorder left (as incomplete), discard empty parts; idempotent."""
    out: dict[str, list[str]] = {"sealed": [], "discarded": []}
    rec_dir, part_dir = directory(data_dir), partial_dir(data_dir)
    for tmp in rec_dir.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)  # a seal cut short; its clear source is still there
    for clear in sorted(part_dir.glob("*.mkv")):
        if clear.stat().st_size == 0:
            clear.unlink()
            out["discarded"].append(clear.name)
            continue
        sealed = seal_file(clear, recipients)
        register(conn, sealed, complete=False)
        out["sealed"].append(sealed.name)
    for sealed in rec_dir.glob("consult-*.mkv.age"):  # sealed, but killed before indexing
        if conn.execute("SELECT 1 FROM consult_recordings WHERE name = ?",
                        (sealed.name,)).fetchone() is None:
            register(conn, sealed, complete=False)
            out["sealed"].append(sealed.name)
    return out


def listing(conn: sqlite3.Connection, consult_id: int | None = None) -> list[dict[str, Any]]:
    sql, args = "SELECT * FROM consult_recordings", ()
    if consult_id is not None:
        sql, args = sql + " WHERE consult_id = ?", (consult_id,)
    return [dict(r) for r in conn.execute(sql + " ORDER BY id", args)]


# -- bundles (appliance.sync calls these) -----------------------------------------------------
def local_recordings(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Sealed recordings made here (not restored from elsewhere), oldest first: what sync ships."""
    return conn.execute("SELECT * FROM consult_recordings WHERE origin = 'local'"
                        " ORDER BY id").fetchall()


def bundle_meta(conn: sqlite3.Connection, name: str) -> dict[str, Any]:
    """What a bundle's manifest says of a recording (no patient data beyond the study UID)."""
    r = conn.execute("SELECT * FROM consult_recordings WHERE name = ?", (name,)).fetchone()
    return {"type": "recording", "consult_id": r["consult_id"], "study_uid": r["study_uid"],
            "complete": bool(r["complete"]), "sealed_at": r["sealed_at"]}


def restore_file(conn: sqlite3.Connection, data_dir: Path, src: Path,
                 meta: dict[str, Any]) -> Path:
    """Put a bundled recording back (still encrypted) and index it as restored."""
    if not NAME_RE.match(src.name):
        raise ValueError(f"not a recording name: {src.name}")
    dest = directory(data_dir) / src.name
    if not dest.exists():  # the staged file was fsynced by the bundle reader: move it in
        durable.ensure_dir(dest.parent)
        os.chmod(src, 0o600)
        os.replace(src, dest)
        durable.fsync_dir(dest.parent)
    register(conn, dest, origin="restored", meta=meta)
    return dest
