"""The derived HTJ2K frame cache: DATA_DIR/htj2k/<study>/<sop>.<sha>/<frame>.j2c.

Why a cache: encoding a 512×512 CT frame takes ~17 ms here, and a thin-link
reader asks for 300 of them in a burst; the worker encodes each stored frame
once after ingest (never in the C-STORE path), so answering is a file read.
A frame not cached yet is encoded on demand by the request and kept.

The originals are never touched: the cache is derived, names carry the
instance's sha256 (a replaced instance gets new files), and it can be dropped
at any time.  ``htj2k_cache`` (migration 22) lists the instance versions the
sweep has encoded; a restored box starts with no rows and rebuilds.  The sweep
takes STAT studies first, then urgent, then the rest, in bounded runs, and
prunes whole studies (oldest first) once the cache is over ``web.htj2k_cache_mb``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from appliance.core import db, durable
from appliance.dicomweb import htj2k
from appliance.reading import worklist
from dicom_node import index

log = logging.getLogger("appliance.dicomweb")

LEDGER = "htj2k_cache"
SWEEP_SECONDS = 5.0  # one sweep run encodes for at most this long
CANDIDATES = 2000  # unencoded instances considered per run (then ordered by priority)
PRUNE_INTERVAL_S = 60.0
PRUNED = "pruned"
EOC = b"\xff\xd9"  # end of codestream: a cached file without it is torn, made again
_last_prune: dict[str, float] = {}


def root(cfg: Any) -> Path:
    return cfg.data_dir / "htj2k"


def instance_dir(cfg: Any, study_uid: str, sop_uid: str, sha256: str) -> Path:
    """Where one instance version's frames live (the sha in the name: replaced ones differ)."""
    return root(cfg) / study_uid / f"{sop_uid}.{sha256[:16]}"


def stored_frame(path: Path, n: int) -> tuple[np.ndarray, int, bool]:
    """Frame ``n`` as stored values (no Rescale, no colour conversion), Bits Stored, signed."""
    from pydicom.pixels import pixel_array

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples == 3 and photometric != "RGB":
        raise htj2k.EncodeError(f"colour frames are coded as RGB only, this one is {photometric}")
    arr = pixel_array(str(path), index=n - 1, raw=True)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    return arr, bits, bool(int(ds.get("PixelRepresentation", 0)))


def encode_frame(path: Path, n: int) -> bytes:
    """Frame ``n`` of a stored file as a lossless HTJ2K RPCL codestream."""
    arr, bits, signed = stored_frame(path, n)
    return htj2k.encode(arr, bits, signed)


def _read_cached(p: Path) -> bytes | None:
    try:
        data = p.read_bytes()
    except OSError:
        return None
    return data if data.endswith(EOC) else None


def frame(cfg: Any, row: dict[str, Any], n: int) -> bytes:
    """Frame ``n`` of an instance (a metadata row: study/sop uid, sha256, path) from the cache,
    encoded now and kept when it is not there. EncodeError when it cannot be coded."""
    p = instance_dir(cfg, row["study_uid"], row["sop_uid"], row["sha256"]) / f"{n}.j2c"
    data = _read_cached(p)
    if data is None:
        data = encode_frame(cfg.studies_dir / row["path"], n)
        try:
            durable.atomic_write(p, data, 0o600)
        except OSError as e:  # a full disk costs the cache, never the answer
            log.warning("htj2k cache write %s failed: %s", p, e)
    return data


def _frames_in(path: Path) -> int:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if "Rows" not in ds:
        return 0
    return int(ds.get("NumberOfFrames", 1) or 1)


def encode_instance(cfg: Any, row: dict[str, Any]) -> tuple[int, int]:
    """Every frame of one instance version into the cache: (frames, bytes). Idempotent."""
    path = cfg.studies_dir / row["path"]
    count = _frames_in(path)
    total = 0
    for n in range(1, count + 1):
        total += len(frame(cfg, row, n))
    return count, total


def _rank(conn: sqlite3.Connection, study_uid: str, ranks: dict[str, int]) -> int:
    """The study's read priority rank (STAT lowest); studies without a read item last."""
    if study_uid not in ranks:
        item = worklist.item_for_study(conn, study_uid)
        ranks[study_uid] = int(item["priority_rank"]) if item else 1_000
    return ranks[study_uid]


def pending(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Instance versions not encoded yet, STAT studies first, then by study and path."""
    rows = [dict(r) for r in index.unlisted_instances(conn, LEDGER, limit=CANDIDATES)]
    ranks: dict[str, int] = {}
    return sorted(rows, key=lambda r: (_rank(conn, r["study_uid"], ranks), r["study_uid"],
                                       r["path"]))


def _record(conn: sqlite3.Connection, row: dict[str, Any], frames: int, size: int,
            error: str) -> None:
    """List the instance version as done (or as not codable, with why) in one short write."""
    with db.transaction(conn):
        conn.execute(
            "INSERT INTO htj2k_cache (sop_uid, study_uid, sha256, frames, bytes, error, made_at)"
            " VALUES (?,?,?,?,?,?,?) ON CONFLICT(sop_uid) DO UPDATE SET"
            " study_uid = excluded.study_uid, sha256 = excluded.sha256, frames = excluded.frames,"
            " bytes = excluded.bytes, error = excluded.error, made_at = excluded.made_at",
            (row["sop_uid"], row["study_uid"], row["sha256"], frames, size, error, time.time()))


def _drop_old_versions(cfg: Any, row: dict[str, Any]) -> None:
    """Remove the frames of earlier versions of this instance (it was replaced)."""
    keep = instance_dir(cfg, row["study_uid"], row["sop_uid"], row["sha256"]).name
    study = root(cfg) / row["study_uid"]
    for old in study.glob(f"{row['sop_uid']}.*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def sweep(cfg: Any, budget_s: float = SWEEP_SECONDS) -> int:
    """Worker sweep: encode pending instances (STAT first) for up to ``budget_s``, then prune.

    Killed mid-run, the next run finds the same instances unlisted and skips the
    frames already on disk.  An instance that cannot be coded is listed with the
    reason, so it is not retried every run (requests then answer 406 with it).
    """
    if not htj2k.available():
        return 0
    conn = db.connect(cfg.db_path)
    done = 0
    try:
        deadline = time.monotonic() + budget_s
        for row in pending(conn):
            if done and time.monotonic() > deadline:  # at least one per run
                break
            try:
                frames, size = encode_instance(cfg, row)
                error = ""
            except (htj2k.EncodeError, ValueError, OSError, AttributeError,
                    NotImplementedError, RuntimeError) as e:
                frames, size, error = 0, 0, str(e)[:300] or type(e).__name__
                log.warning("htj2k encode of %s failed: %s", row["sop_uid"], error)
            _drop_old_versions(cfg, row)
            _record(conn, row, frames, size, error)
            done += 1
        maybe_prune(conn, cfg)
        return done
    finally:
        conn.close()


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def maybe_prune(conn: sqlite3.Connection, cfg: Any, force: bool = False) -> int:
    """At most once a minute: prune whole studies, oldest first, above ``web.htj2k_cache_mb``."""
    key = str(cfg.data_dir)
    now = time.monotonic()
    if not force and now - _last_prune.get(key, -PRUNE_INTERVAL_S) < PRUNE_INTERVAL_S:
        return 0
    _last_prune[key] = now
    return prune(conn, cfg, int(cfg["web"]["htj2k_cache_mb"]) * 1024 * 1024)


def prune(conn: sqlite3.Connection, cfg: Any, limit_bytes: int) -> int:
    """Delete the oldest studies' frames until the cache holds at most ``limit_bytes``.

    Their rows stay, marked pruned, so the sweep does not encode them again; a
    request for one of their frames encodes it on demand.  Returns studies pruned.
    """
    base = root(cfg)
    if not base.is_dir():
        return 0
    studies = []
    for d in base.iterdir():
        if d.is_dir():
            studies.append((d.stat().st_mtime, d, _dir_bytes(d)))
    total = sum(s[2] for s in studies)
    pruned = 0
    for _, d, size in sorted(studies, key=lambda s: s[0]):
        if total <= limit_bytes:
            break
        shutil.rmtree(d, ignore_errors=True)
        total -= size
        pruned += 1
        with db.transaction(conn):
            conn.execute("UPDATE htj2k_cache SET bytes = 0, error = ? WHERE study_uid = ?",
                         (PRUNED, d.name))
        log.info("htj2k cache: pruned study %s (%d bytes)", d.name, size)
    return pruned


def cached_bytes(conn: sqlite3.Connection) -> int:
    """Bytes the sweep has put in the cache (pruned studies count zero)."""
    return int(conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM htj2k_cache").fetchone()[0])
