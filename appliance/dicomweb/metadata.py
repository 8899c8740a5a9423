"""WADO-RS metadata (PS3.18 §10.4.1.1.2): DICOM JSON kept once per instance, not re-read per request.

Orthanc reads every file of a series to answer ``/metadata`` (~240 ms for a
300-slice CT here).  We parse each file's header once, keep its DICOM JSON in
``dicomweb_metadata`` (migration 8) together with where each frame's bytes lie
in the file, and answer a series by concatenating stored rows (no JSON is parsed
per request).  Rows are written at ingest in the index transaction (the store's
``derive`` hook: node, STOW-RS, restore, start-up recovery); what is stored
without it (a corrected copy from identity reconciliation, rows older than the
hook) the worker's sweep makes from the file within a sweep interval, and the
first request that still finds one missing makes it lazily.  A row whose file hash
differs from the index (the instance was replaced) is made again, so the cache can
never serve stale metadata.

Bulk data (PixelData and large binary values) is not inlined: it is a
``BulkDataURI`` under the instance.  The stored JSON holds the marker
``@BASE@`` where the request's ``…/dicom-web`` base goes.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sqlite3
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.uid import UID

log = logging.getLogger("appliance.dicomweb")

BASE_MARKER = "@BASE@"
PIXEL_DATA = 0x7FE00010
BULK_THRESHOLD = 1024  # binary values above this many bytes become BulkDataURIs
SWEEP_BATCH = 400  # instances per sweep run, so one run stays short
WATERMARK = "dicomweb_metadata.last_rowid"  # settings key: how far the sweep has come
REPLACED_WATERMARK = "dicomweb_metadata.last_version_id"  # … through instance_versions
_ITEM, _SEQ_END = 0xE000FFFE, 0xE0DDFFFE  # item / sequence delimitation tags (little endian)


def _row_sql() -> str:
    return ("SELECT i.rowid AS rid, i.sop_uid, i.series_uid, i.study_uid, i.path, i.sha256,"
            " i.transfer_syntax,"
            " m.sha256 AS cached_sha, m.json, m.pixel FROM instances i"
            " LEFT JOIN dicomweb_metadata m ON m.sop_uid = i.sop_uid")


def compute(path: Path, study_uid: str, series_uid: str, sop_uid: str) -> tuple[str, str]:
    """(DICOM JSON text, frame index JSON text) of one stored file; reads the header only."""
    with open(path, "rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        pixel_pos = f.tell()
        ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")))
        pixel = _frame_index(f, pixel_pos, ts, ds)
    return _texts(ds, ts, pixel, study_uid, series_uid, sop_uid)


def from_received(ds: pydicom.Dataset, data: bytes, study_uid: str, series_uid: str,
                  sop_uid: str) -> tuple[str, str]:
    """:func:`compute` for an instance being received: its parsed dataset and bytes in memory.

    The same texts as reading the stored file later (the file *is* ``data``),
    made without opening it: the store calls this while it fsyncs the file.
    """
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")))
    pixel = None
    raw = ds.get_item(PIXEL_DATA)
    tell = getattr(raw, "value_tell", None) if raw is not None else None
    if tell is not None:
        implicit = ts == "1.2.840.10008.1.2"
        pixel = _frame_index(io.BytesIO(data), tell - (8 if implicit else 12), ts, ds)
    return _texts(ds, ts, pixel, study_uid, series_uid, sop_uid)


def _texts(ds: pydicom.Dataset, ts: UID, pixel: dict[str, Any] | None, study_uid: str,
           series_uid: str, sop_uid: str) -> tuple[str, str]:
    prefix = f"{BASE_MARKER}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/bulkdata/"

    def bulk(elem: DataElement) -> str:
        return prefix + f"{elem.tag:08X}"

    obj = _json_dict(ds, bulk)
    obj["00083002"] = {"vr": "UI", "Value": [str(ts)]}  # AvailableTransferSyntaxUID
    if pixel is not None:
        vr = "OB" if pixel["enc"] or ds.get("BitsAllocated", 16) <= 8 else "OW"
        obj["7FE00010"] = {"vr": vr, "BulkDataURI": prefix + "7FE00010"}
    text = json.dumps(dict(sorted(obj.items())), separators=(",", ":"), ensure_ascii=False)
    return text, json.dumps(pixel) if pixel is not None else ""


_SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})  # one value; a backslash is text
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UC", "UI", "PN",
                       *_SINGLE_TEXT_VRS})
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _json_dict(ds: pydicom.Dataset, bulk: Callable[[DataElement], str]) -> dict[str, Any]:
    """pydicom's ``Dataset.to_json_dict``, with plain single values read from the raw bytes.

    Converting every element through pydicom was ~1.5 ms of a 300-slice CT's
    instance, paid in the C-STORE path now that metadata is made at ingest.
    A single plain-ASCII text value or a little-endian US is written straight
    from its bytes; anything else (several values, other charsets, leading
    blanks, numbers as text, sequences, binary) goes through pydicom as before.
    """
    out: dict[str, Any] = {}
    for tag in ds.keys():
        if tag == PIXEL_DATA:  # a BulkDataURI, added by the caller (as a header-only read)
            continue
        raw = ds.get_item(tag)
        fast = _raw_json(raw) if isinstance(raw, RawDataElement) else None
        out[f"{tag:08X}"] = fast if fast is not None else ds[tag].to_json_dict(
            bulk_data_element_handler=bulk, bulk_data_threshold=BULK_THRESHOLD)
    return out


def _raw_json(raw: RawDataElement) -> dict[str, Any] | None:
    """The DICOM JSON of a raw element as pydicom writes it, or None to leave it to pydicom."""
    vr, value = raw.VR, raw.value
    if vr is None or type(value) is not bytes:
        return None
    if vr == "US":
        if len(value) == 2 and raw.is_little_endian:
            return {"vr": vr, "Value": [int.from_bytes(value, "little")]}
        return None
    if vr not in _TEXT_VRS and vr not in ("DS", "IS"):
        return None
    if not value.isascii() or b"\x1b" in value or (vr == "PN" and b"=" in value):
        return None
    text = value.decode("ascii").rstrip("\0 ")
    if not text:
        return {"vr": vr}
    if vr in _SINGLE_TEXT_VRS or vr == "PN":
        if "\\" in text or text[0] == " ":
            return None
        return {"vr": vr, "Value": [{"Alphabetic": text} if vr == "PN" else text]}
    items = text.split("\\")
    if vr == "DS":
        return _numbers(vr, items, float)
    if vr == "IS":
        return _numbers(vr, items, int) if all(_INTEGER.fullmatch(v.strip()) for v in items) \
            else None
    if any(not v or v != v.strip() for v in items):
        return None
    return {"vr": vr, "Value": items}


def _numbers(vr: str, items: list[str], kind: type) -> dict[str, Any] | None:
    try:
        return {"vr": vr, "Value": [kind(v.strip()) for v in items]}
    except ValueError:
        return None  # pydicom decides what an odd number reads as


def _frame_index(f: Any, pos: int, ts: UID, ds: pydicom.Dataset) -> dict[str, Any] | None:
    """Where each frame's bytes are: native (offset + frame size) or encapsulated fragments.

    None when there is no pixel data, or a layout we leave to pydicom (deflate,
    big endian, 1-bit, fragments we cannot assign to frames without decoding).
    """
    f.seek(pos)
    head = f.read(12)
    if len(head) < 8 or head[:4] != b"\xe0\x7f\x10\x00":
        return None
    if str(ts) in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"):
        return None
    if ts == "1.2.840.10008.1.2":  # implicit VR: tag, 4-byte length
        length, start = struct.unpack("<I", head[4:8])[0], pos + 8
    elif head[4:6] in (b"OB", b"OW", b"UN", b"OF", b"OD", b"OL", b"OV"):
        length, start = struct.unpack("<I", head[8:12])[0], pos + 12
    else:
        length, start = struct.unpack("<H", head[6:8])[0], pos + 8
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if length != 0xFFFFFFFF:
        bits = int(ds.get("BitsAllocated", 16))
        if bits % 8:
            return None
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
        if size * n > length:
            return None
        return {"ts": str(ts), "enc": False, "offset": start, "size": size, "n": n}
    return _fragments(f, start, n, str(ts))


def _fragments(f: Any, start: int, n: int, ts: str) -> dict[str, Any] | None:
    f.seek(start)
    items: list[tuple[int, int, int]] = []  # (item header position, value offset, length)
    pos = start
    while True:
        head = f.read(8)
        if len(head) < 8:
            return None
        tag, length = struct.unpack("<II", head)
        if tag == _SEQ_END:
            break
        if tag != _ITEM or length == 0xFFFFFFFF:
            return None
        items.append((pos, pos + 8, length))
        pos += 8 + length
        f.seek(pos)
    if not items:
        return None
    bot_item, frags = items[0], items[1:]
    if not frags:
        return None
    if n == 1:
        frames = [[[off, ln] for _, off, ln in frags]]
    elif len(frags) == n:
        frames = [[[off, ln]] for _, off, ln in frags]
    elif bot_item[2] == 4 * n:
        f.seek(bot_item[1])
        offsets = list(struct.unpack(f"<{n}I", f.read(4 * n)))
        first = frags[0][0]
        bounds = offsets[1:] + [1 << 62]
        frames = [[[off, ln] for p, off, ln in frags if lo <= p - first < hi]
                  for lo, hi in zip(offsets, bounds, strict=True)]
        if any(not fr for fr in frames):
            return None
    else:
        return None
    return {"ts": ts, "enc": True, "frames": frames, "n": n}


def at_ingest(ds: pydicom.Dataset, data: bytes, rec: Any) -> Callable[[sqlite3.Connection], None]:
    """The study store's ``derive`` hook: this instance's row, written in its index transaction.

    Built from the dataset the store has just parsed, while the store fsyncs
    the file, so the first ``/metadata`` of a series never opens a file. The
    row is derived data committed with the index row (no extra fsync); start-up
    recovery calls it too for the files it reindexes. What is still stored
    without one (a store opened without this hook) the sweep makes from the
    file, and the lazy fill in :func:`instances` as a last resort.
    """
    text, pixel = from_received(ds, data, rec.study_uid, rec.series_uid, rec.sop_uid)
    row = (rec.sop_uid, rec.series_uid, rec.sha256, text, pixel)
    return lambda conn: _upsert(conn, [row])


def _store(conn: sqlite3.Connection, made: list[tuple[str, str, str, str, str]]) -> None:
    """Upsert computed rows in one short transaction (sweep and lazy fill may race: last wins)."""
    if not made:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        _upsert(conn, made)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _upsert(conn: sqlite3.Connection, made: list[tuple[str, str, str, str, str]]) -> None:
    now = time.time()
    conn.executemany(
        "INSERT INTO dicomweb_metadata (sop_uid, series_uid, sha256, json, pixel, made_at)"
        " VALUES (?,?,?,?,?,?) ON CONFLICT(sop_uid) DO UPDATE SET sha256 = excluded.sha256,"
        " json = excluded.json, pixel = excluded.pixel, made_at = excluded.made_at",
        [(*m, now) for m in made])


def _fill(conn: sqlite3.Connection, studies_dir: Path, rows: list[sqlite3.Row]) -> dict[str, dict]:
    """Rows with a current cache entry as dicts; missing or stale ones computed and stored."""
    out: dict[str, dict] = {}
    made = []
    for r in rows:
        d = dict(r)
        if d["cached_sha"] != d["sha256"]:
            try:
                d["json"], d["pixel"] = compute(studies_dir / d["path"], d["study_uid"],
                                                d["series_uid"], d["sop_uid"])
            except (OSError, Exception) as e:  # a damaged file must not hide the rest
                log.warning("metadata for %s failed: %s", d["sop_uid"], e)
                continue
            made.append((d["sop_uid"], d["series_uid"], d["sha256"], d["json"], d["pixel"]))
        out[d["sop_uid"]] = d
    _store(conn, made)
    return out


def instances(conn: sqlite3.Connection, studies_dir: Path, where: str,
              params: tuple) -> list[dict]:
    """Cache rows (json, pixel, path, sha256, transfer_syntax…) of the instances matching ``where``."""
    rows = conn.execute(f"{_row_sql()} WHERE {where} ORDER BY i.series_uid, i.instance_number,"
                        " i.sop_uid", params).fetchall()
    filled = _fill(conn, studies_dir, rows)
    return [filled[r["sop_uid"]] for r in rows if r["sop_uid"] in filled]


def render(rows: list[dict], base_url: str) -> bytes:
    """The JSON array for a list of cache rows, with the request's base in every BulkDataURI."""
    body = "[" + ",".join(r["json"] for r in rows) + "]"
    return body.replace(BASE_MARKER, base_url).encode("utf-8")


def sweep(cfg: Any) -> int:
    """Worker sweep: metadata for instances indexed or replaced since the last run, bounded.

    It walks the index by rowid from a watermark kept in ``settings``, so a
    run costs the same with 300 or 300,000 instances stored, and a file that
    cannot be read is passed over (its request then reports it). A replaced
    instance keeps its rowid but leaves a row in ``instance_versions``: a second
    watermark walks those, so a corrected copy stored without the ingest hook
    (identity reconciliation) gets its row here, not in a reader's request.
    Killed mid-run, the next run redoes the batch; rows already made are skipped.
    Returns how many index and version rows the run looked at.
    """
    from appliance.core import db

    conn = db.connect(cfg.db_path)
    try:
        new = _sweep_walk(conn, cfg.studies_dir, WATERMARK,
                          f"{_row_sql()} WHERE i.rowid > ? ORDER BY i.rowid LIMIT ?")
        replaced = _sweep_walk(conn, cfg.studies_dir, REPLACED_WATERMARK,
                               f"SELECT v.id AS mark, q.* FROM instance_versions v"
                               f" JOIN ({_row_sql()}) q ON q.sop_uid = v.sop_uid"
                               " WHERE v.id > ? ORDER BY v.id LIMIT ?")
        return new + replaced
    finally:
        conn.close()


def _sweep_walk(conn: sqlite3.Connection, studies_dir: Path, key: str, sql: str) -> int:
    """One bounded batch after watermark ``key``: stale or missing rows made, mark moved on."""
    mark = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    rows = conn.execute(sql, (int(mark["value"]) if mark else 0, SWEEP_BATCH)).fetchall()
    if not rows:
        return 0
    stale = {r["sop_uid"]: r for r in rows if r["cached_sha"] != r["sha256"]}
    _fill(conn, studies_dir, list(stale.values()))
    last = rows[-1]["mark"] if "mark" in rows[-1].keys() else rows[-1]["rid"]
    conn.execute("INSERT INTO settings (key, value) VALUES (?, ?)"
                 " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, str(last)))
    return len(rows)
