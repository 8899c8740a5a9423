"""The study store: DICOM files as received, written durably, and their index.

Both the C-STORE handler and STOW-RS go through :meth:`StudyStore.store`, so
"acknowledged means durable" has one implementation: the caller may report
success only once ``store`` has returned an ``OK`` or ``DUPLICATE`` result,
which happens after the file is fsynced, renamed, its directory fsynced, and
the index row committed with ``synchronous=FULL``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from dicom_node import durable
from dicom_node import index as idx

log = logging.getLogger("dicom_node.store")

# Outcomes, mapped to DIMSE statuses by the handler and to PS3.18 codes by STOW-RS.
OK = "ok"
DUPLICATE = "duplicate"  # same bytes already stored: success, stored once
REPLACED = "replaced"  # same SOP Instance UID, different bytes: newer kept
INVALID = "invalid"  # cannot parse, or a UID is missing
MOVED = "moved"  # same SOP Instance UID in another study or series: refused, nothing changed
NO_SPACE = "no_space"  # free disk below the low-water mark
FAILED = "failed"  # an I/O or database error: nothing acknowledged

SUCCESS_OUTCOMES = (OK, DUPLICATE, REPLACED)
# derive(dataset, file bytes, record) -> writer(conn) or None: see StudyStore.
DerivedWriter = Callable[[sqlite3.Connection], None]
Derive = Callable[[Dataset, bytes, idx.InstanceRecord], DerivedWriter | None]
INCOMING = ".incoming"  # temp files being written; never served, cleaned on start
WRITE_LOCK = ".write.lock"  # in INCOMING: whose turn it is to rename and index


@dataclass
class StoreResult:
    outcome: str
    comment: str = ""
    record: idx.InstanceRecord | None = None
    # For REPLACED: what was replaced by what (both hashes and paths), for the caller to audit.
    replaced: dict[str, Any] | None = None

    @property
    def success(self) -> bool:
        return self.outcome in SUCCESS_OUTCOMES


@dataclass
class _Pending:
    """An instance whose temp file is fsynced, waiting to be renamed and indexed."""

    tmp: Path
    rec: idx.InstanceRecord
    writer: DerivedWriter | None
    result: StoreResult | None = None


def _safe_component(uid: str) -> str:
    """A path component for a UID; anything not a plain UID is hashed, never trusted."""
    if idx.UID_RE.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class StudyStore:
    """Durable storage of DICOM files plus their index rows.

    ``on_event(kind, detail)`` is the caller's hook (the appliance audits
    through it); ``on_stored(record)`` tells the caller a study changed.
    ``derive(dataset, data, record)`` lets the caller keep something made from the
    parsed dataset (the appliance's DICOMweb metadata) without parsing the
    file again: it runs while the file is being fsynced and returns a
    function that writes its rows inside the index transaction, so they
    commit with the index row or not at all.  None of them may raise into
    the store (a failing derivation is logged and the instance still stored).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        db_path: str | os.PathLike,
        low_water_mb: float = 0,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        on_stored: Callable[[idx.InstanceRecord, str], None] | None = None,
        connect: Callable[[str], sqlite3.Connection] | None = None,
        derive: Derive | None = None,
    ):
        self.root = Path(root)
        self.db_path = str(db_path)
        self.low_water_mb = low_water_mb
        self.on_event = on_event or (lambda kind, detail: None)
        self.on_stored = on_stored or (lambda record, outcome: None)
        self._connect = connect or _default_connect
        self.derive = derive
        self._local = threading.local()
        self._sop_locks: dict[str, threading.Lock] = {}
        self._sop_locks_guard = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._write_mutex = threading.Lock()
        self._group: list[_Pending] = []  # instances waiting for a writer's turn (this process)
        self._group_guard = threading.Lock()
        self._lock_fd = -1
        self._lock_pid = 0
        durable.ensure_dir(self.root)
        # Temp files are written here, on the same filesystem, then renamed into place.
        self.incoming = self.root / INCOMING
        durable.ensure_dir(self.incoming)

    # -- connections (one per thread; opened lazily, after any fork) ------------
    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(self.db_path)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection and the I/O threads (e.g. before a fork)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._lock_pid == os.getpid():
            os.close(self._lock_fd)
            self._lock_pid, self._lock_fd = 0, -1

    def _lock_for(self, sop_uid: str) -> threading.Lock:
        with self._sop_locks_guard:
            lock = self._sop_locks.get(sop_uid)
            if lock is None:
                if len(self._sop_locks) > 10_000:
                    self._sop_locks = {k: v for k, v in self._sop_locks.items() if v.locked()}
                lock = self._sop_locks[sop_uid] = threading.Lock()
            return lock

    # -- the write path --------------------------------------------------------
    def has_space(self) -> bool:
        return durable.free_mb(self.root) >= self.low_water_mb

    def _io(self) -> ThreadPoolExecutor:
        # Created on first use, so after any fork (dicom.processes > 1).
        if self._pool is None:
            with self._sop_locks_guard:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="store-io")
        return self._pool

    def store(
        self, data: bytes, calling_ae: str = "", remote_addr: str = "",
        expected_sop_uid: str | None = None,
    ) -> StoreResult:
        """Store one Part 10 file (preamble + meta + dataset) given as bytes.

        The bytes go to a temp file and are fsynced in one I/O thread and
        hashed in another while this thread parses and validates them (fsync
        and hashlib release the GIL), so the durable write costs little more
        than the parse.  Nothing is written
        when the disk is below the low-water mark; a temp file whose content
        turns out invalid or a duplicate is removed before we answer.
        """
        if not self.has_space():
            return StoreResult(NO_SPACE, f"free disk below the low-water mark ({self.low_water_mb} MiB)")
        pending = self._io().submit(durable.write_temp, self.incoming, data)
        # Hashing here, not in a third thread: hashlib lets go of the GIL while it hashes,
        # which is the moment the writer thread needs it to issue its write and fsync.
        # (A thread handed work while this one parses waits for the GIL: up to the 5 ms
        # switch interval.  Measured: store 2.37 ms → see benchmarks/README.md.)
        digest = _sha256(data)
        ds, described = _describe(data, calling_ae, remote_addr, expected_sop_uid)
        writer = None
        if not isinstance(described, StoreResult):
            described.sha256 = digest
            writer = self._derive(ds, data, described)
        try:
            tmp = pending.result()
        except OSError as e:
            if _disk_full(e):
                return StoreResult(NO_SPACE, "disk full: nothing stored")
            log.exception("temp write failed")
            return StoreResult(FAILED, f"storage error: {_short(e)}")
        if isinstance(described, StoreResult):
            durable.discard(tmp)
            return described
        with self._lock_for(described.sop_uid):
            return self._commit_in_group(_Pending(tmp, described, writer))

    def _commit_in_group(self, item: _Pending) -> StoreResult:
        """Rename and index this instance together with whatever this process has waiting.

        Group commit: the thread that gets the writer's turn takes every
        instance queued in this process meanwhile and places them all in one
        transaction: one fsync per directory and one WAL commit for the group,
        where each instance paid two fsyncs under the lock before.  Every
        instance's result is set only after that commit (and the directory
        fsyncs), so no caller answers Success before its instance is durable.
        A thread that finds its instance already committed by another returns
        without touching the file lock.
        """
        with self._group_guard:
            self._group.append(item)
        with self._write_mutex:
            if item.result is None:
                with self._group_guard:
                    batch, self._group = self._group, []
                with self._file_lock():
                    self._write_group(batch)
        assert item.result is not None
        return item.result

    @contextlib.contextmanager
    def _file_lock(self):
        """One store writer at a time across processes (callers hold ``_write_mutex``).

        Every writer would get SQLite's write lock in turn anyway; waiting for it
        in SQLite's busy handler means sleeping 1, 2, 5, 10… ms between retries,
        which with four parallel senders cost more than the writes themselves.
        A lock file held with ``flock`` (after an in-process mutex: flock does
        not exclude threads sharing one descriptor) hands over at once.
        """
        if self._lock_pid != os.getpid():  # opened after any fork, never shared across one
            self._lock_fd = os.open(self.incoming / WRITE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            self._lock_pid = os.getpid()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _derive(self, ds: Dataset, data: bytes, rec: idx.InstanceRecord) -> DerivedWriter | None:
        if self.derive is None:
            return None
        try:
            return self.derive(ds, data, rec)
        except Exception:
            log.exception("derive hook failed for %s", rec.sop_uid)
            return None

    def _write_derived(self, conn: sqlite3.Connection, writer: DerivedWriter | None,
                       rec: idx.InstanceRecord) -> None:
        """The derived rows, in the open transaction; a failure there only loses them."""
        if writer is None:
            return
        conn.execute("SAVEPOINT derived")
        try:
            writer(conn)
            conn.execute("RELEASE derived")
        except Exception:
            conn.execute("ROLLBACK TO derived")
            conn.execute("RELEASE derived")
            log.exception("derived rows not written for %s", rec.sop_uid)

    def _write_group(self, batch: list[_Pending]) -> None:
        """Place and index a group in one write transaction; set every item's result.

        The renames happen while we hold SQLite's write lock, so two node
        processes given the same SOP Instance UID at once cannot both pick the
        unversioned name.  Any error fails the whole group: nothing of it is
        acknowledged, its new files are removed.  Hooks run after the commit
        (an audit row needs the write lock this transaction holds).
        """
        conn, placed, dirs, after = self.conn, [], set(), []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                item.result = self._place(conn, item, placed, dirs, after)
            for d in sorted(dirs):
                durable.fsync_dir(d)
            conn.execute("COMMIT")
        except Exception as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for final in placed:
                durable.discard(final)  # not acknowledged (e.g. SQLite full): nothing left
            log.exception("store failed for %d instance(s)", len(batch))
            failed = (StoreResult(NO_SPACE, "disk full: nothing stored") if _disk_full(e)
                      else StoreResult(FAILED, f"storage error: {_short(e)}"))
            for item in batch:
                durable.discard(item.tmp)
                item.result = failed
            return
        for kind, detail in after:
            self._emit(kind, detail)
        for item in batch:
            if item.result.outcome in (OK, REPLACED):
                self._notify(item.rec, item.result.outcome)

    def _place(self, conn: sqlite3.Connection, item: _Pending, placed: list[Path],
               dirs: set[Path], after: list[tuple[str, dict[str, Any]]]) -> StoreResult:
        """One instance of a group: its outcome, its file renamed and its rows written."""
        rec, tmp = item.rec, item.tmp
        current = idx.lookup(conn, rec.sop_uid)
        if current is not None and current["sha256"] == rec.sha256:
            durable.discard(tmp)
            rec.path = current["path"]
            return StoreResult(DUPLICATE, "identical instance already stored", rec)
        moved = _moved(current, rec) if current is not None else ""
        if moved:
            durable.discard(tmp)
            after.append(("instance.replace_refused", {
                "sop_uid": rec.sop_uid, "study_uid": current["study_uid"],
                "new_study_uid": rec.study_uid, "old_sha256": current["sha256"],
                "new_sha256": rec.sha256, "calling_ae": rec.calling_ae,
                "remote_addr": rec.remote_addr, "reason": moved,
            }))
            return StoreResult(MOVED, moved, rec)
        rec.path = self.relative_path(rec, version=rec.sha256[:12] if current else None)
        final = self.root / rec.path
        durable.ensure_dir(final.parent)
        if not final.exists():
            placed.append(final)
        os.replace(tmp, final)
        dirs.add(final.parent)
        if current is None:
            idx.insert(conn, rec)
            self._write_derived(conn, item.writer, rec)
            return StoreResult(OK, "", rec)
        idx.replace(conn, current, rec)
        self._write_derived(conn, item.writer, rec)
        replaced = {
            "sop_uid": rec.sop_uid, "study_uid": rec.study_uid, "old_sha256": current["sha256"],
            "new_sha256": rec.sha256, "old_path": current["path"], "new_path": rec.path,
            "calling_ae": rec.calling_ae,
        }
        after.append(("instance.replaced", replaced))
        return StoreResult(REPLACED, "", rec, replaced)

    def relative_path(self, rec: idx.InstanceRecord, version: str | None = None) -> str:
        name = _safe_component(rec.sop_uid) + (f".{version}" if version else "") + ".dcm"
        return f"{_safe_component(rec.study_uid)}/{_safe_component(rec.series_uid)}/{name}"

    def path_of(self, relative: str) -> Path:
        return self.root / relative

    def _emit(self, kind: str, detail: dict[str, Any]) -> None:
        try:
            self.on_event(kind, detail)
        except Exception:
            log.exception("on_event hook failed for %s", kind)

    def _notify(self, rec: idx.InstanceRecord, outcome: str) -> None:
        try:
            self.on_stored(rec, outcome)
        except Exception:
            log.exception("on_stored hook failed for %s", rec.sop_uid)

    # -- start-up recovery ------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Remove temp files a crash left; index any stored file the index lacks.

        A file can be on disk without its row when the process died between
        the rename and the commit: that C-STORE was never acknowledged, but the
        bytes are whole, so we keep them rather than make the modality resend.
        """
        removed = durable.remove_temp_files(self.root)
        known = {r[0] for r in self.conn.execute(
            "SELECT path FROM instances UNION SELECT path FROM instance_versions")}
        reindexed = 0
        for path in sorted(self.root.rglob("*.dcm")):
            rel = path.relative_to(self.root).as_posix()
            if rel in known:
                continue
            if self._reindex(path, rel):
                reindexed += 1
        if removed or reindexed:
            self._emit("store.recovered", {"temp_files_removed": removed, "reindexed": reindexed})
        return {"temp_files_removed": removed, "reindexed": reindexed}

    def _reindex(self, path: Path, rel: str) -> bool:
        data = path.read_bytes()
        try:  # the whole dataset (pixels where they lie): the derive hook reads frame offsets
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=self.derive is None)
        except Exception:
            log.warning("unreadable file left in store: %s", rel)
            return False
        study, series, instance = idx.attributes(ds)
        meta = getattr(ds, "file_meta", None)
        rec = idx.InstanceRecord(
            study_uid=_uid(ds, "StudyInstanceUID"), series_uid=_uid(ds, "SeriesInstanceUID"),
            sop_uid=_uid(ds, "SOPInstanceUID"), sop_class_uid=_uid(ds, "SOPClassUID"),
            transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta else "",
            path=rel, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
            received_at=path.stat().st_mtime, study=study, series=series, instance=instance,
        )
        if not (rec.study_uid and rec.series_uid and rec.sop_uid):
            return False
        writer = self._derive(ds, data, rec)
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = idx.lookup(conn, rec.sop_uid)
            if current is None:
                idx.insert(conn, rec)
                self._write_derived(conn, writer, rec)
            elif current["sha256"] != rec.sha256:
                idx.replace(conn, current, rec)
                self._write_derived(conn, writer, rec)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._notify(rec, OK)
        return True


def _moved(current: sqlite3.Row, rec: idx.InstanceRecord) -> str:
    """Why a new version may not replace ``current``: it names another study or series.

    Replacing in place is how a modality corrects an image; a file with the
    same SOP Instance UID under another study would leave the index pointing
    the old study at a file that belongs elsewhere (or hide a collision).
    """
    if current["study_uid"] != rec.study_uid:
        return "SOP Instance UID already stored in another study"
    if current["series_uid"] != rec.series_uid:
        return "SOP Instance UID already stored in another series"
    return ""


def _describe(data: bytes, calling_ae: str, remote_addr: str,
              expected_sop_uid: str | None) -> tuple[Dataset | None, idx.InstanceRecord | StoreResult]:
    """Parse and check one Part 10 file: (dataset, its index record), or an INVALID result."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        problem = structure_problem(ds)
    except Exception as e:  # pydicom raises many kinds on malformed input
        return None, StoreResult(INVALID, f"cannot parse dataset: {_short(e)}")
    if problem:
        return ds, StoreResult(INVALID, problem)
    return ds, _record(ds, data, calling_ae, remote_addr, expected_sop_uid)


def _record(ds: Dataset, data: bytes, calling_ae: str, remote_addr: str,
            expected_sop_uid: str | None) -> idx.InstanceRecord | StoreResult:
    uids = {k: plain_uid(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                          "SOPInstanceUID")}
    missing = [k for k, v in uids.items() if not v]
    if missing:
        return StoreResult(INVALID, f"missing {', '.join(missing)}")
    sop_uid = uids["SOPInstanceUID"]
    if expected_sop_uid and expected_sop_uid.strip("\0 ") != sop_uid:
        return StoreResult(INVALID, "SOP Instance UID in dataset differs from the request")
    try:
        study, series, instance = idx.attributes(ds, text=plain_text, integer=plain_int)
    except Exception as e:
        return StoreResult(INVALID, f"unreadable attributes: {_short(e)}")
    meta = getattr(ds, "file_meta", None)
    return idx.InstanceRecord(
        study_uid=uids["StudyInstanceUID"], series_uid=uids["SeriesInstanceUID"], sop_uid=sop_uid,
        sop_class_uid=_uid(ds, "SOPClassUID") or (_uid(meta, "MediaStorageSOPClassUID") if meta else ""),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta else "",
        path="", size=len(data), sha256="",  # filled in by the caller, hashed in parallel
        received_at=time.time(), calling_ae=calling_ae, remote_addr=remote_addr,
        study=study, series=series, instance=instance,
    )


# -- reading index values without pydicom's value conversion ---------------------------------
# Converting each element (VR parsing, validation, charset decoding) was about 40% of the
# parse of a received instance.  Most index values are plain ASCII or a little-endian US:
# those are read from the raw bytes; anything else (another charset's bytes, escapes,
# several values, an IS like "1.0") goes through pydicom exactly as before.
def _raw_bytes(ds: Dataset, keyword: str) -> tuple[bytes | None, bool]:
    """(raw value, True) when the element is still unconverted bytes; (None, True) if absent."""
    elem = ds.get_item(_tag(keyword))
    if elem is None:
        return None, True
    if isinstance(elem, RawDataElement) and type(elem.value) is bytes:
        return elem.value, True
    return None, False


def _plain(raw: bytes) -> str | None:
    if raw.isascii() and b"\\" not in raw and b"\x1b" not in raw:
        return raw.decode("ascii").rstrip(" \x00")
    return None


def _raw_text(ds: Dataset, keyword: str) -> str | None:
    """``keyword``'s value straight from the header bytes ("" when absent), or None when
    they are not plain ASCII text and pydicom must read them."""
    raw, is_raw = _raw_bytes(ds, keyword)
    if not is_raw:
        return None
    return "" if raw is None else _plain(raw)


def plain_text(ds: Dataset, keyword: str) -> str:
    """The index's text of ``keyword`` (as :func:`index.attributes` reads it by default)."""
    text = _raw_text(ds, keyword)
    return text.strip() if text is not None else idx._text_of(ds, keyword)


def plain_int(ds: Dataset, keyword: str) -> int | None:
    """The index's integer of ``keyword``: a US read little-endian, a plain IS parsed."""
    raw, is_raw = _raw_bytes(ds, keyword)
    if is_raw:
        if raw is None:
            return None
        elem = ds.get_item(_tag(keyword))
        vr = elem.VR or _dictionary_vr(keyword)
        if vr == "US" and len(raw) == 2 and elem.is_little_endian:
            return int.from_bytes(raw, "little")
        text = _plain(raw) if vr == "IS" else None
        if text is not None:
            text = text.strip()
            if not text:
                return None
            if _INTEGER.fullmatch(text):
                return int(text)
    return idx._int_of(ds, keyword)


def plain_uid(ds: Dataset, keyword: str) -> str:
    text = _raw_text(ds, keyword)
    return text.strip("\0 ") if text is not None else _uid(ds, keyword)


_INTEGER = re.compile(r"[+-]?[0-9]+")


@functools.cache
def _tag(keyword: str) -> int:
    return tag_for_keyword(keyword)


@functools.cache
def _dictionary_vr(keyword: str) -> str:
    return dictionary_VR(_tag(keyword))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_LAYOUT = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames")


def structure_problem(ds: Dataset) -> str | None:
    """Why a parsed dataset cannot be kept as an image, or None.

    pydicom is lenient: an element cut short by a truncated transfer reads as
    fewer bytes than its declared length, and a dataset encoded differently
    from its transfer syntax reads as one huge bogus element.  Both show up
    here as a length mismatch.  The attributes that lay out the pixel data
    must be numbers (pydicom's ``badVR`` has NumberOfFrames '1A'), and native
    pixel data must hold the bytes they promise; a viewer could not show it
    otherwise.  Other odd values are kept as received.
    """
    for tag in ds.keys():
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if length is None or length == UNDEFINED_LENGTH or not isinstance(value, bytes):
            continue
        if len(value) != length:
            return (f"truncated: element {tag} declares {length} bytes, "
                    f"{len(value)} received")
    if "PixelData" not in ds:
        return None
    layout = {}
    for keyword in _PIXEL_LAYOUT:
        if keyword not in ds:
            continue
        value = ds[keyword].value
        try:
            layout[keyword] = int(value)
        except (TypeError, ValueError):
            return f"{keyword} {value!r} is not a number: pixel data cannot be read"
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta else None
    if syntax is not None and getattr(syntax, "is_encapsulated", False):
        return None
    bits = layout.get("BitsAllocated", 0)
    if bits < 8:
        return None
    expected = (layout.get("Rows", 0) * layout.get("Columns", 0) * layout.get("SamplesPerPixel", 1)
                * (bits // 8) * max(1, layout.get("NumberOfFrames", 1)))
    if len(ds.get_item("PixelData").value or b"") < expected:
        return f"pixel data holds fewer bytes than Rows x Columns x frames need ({expected})"
    return None


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, sqlite3.OperationalError) and "full" in str(e)


def _uid(ds: Any, keyword: str) -> str:
    if ds is None:
        return ""
    value = ds.get(keyword)
    return str(value).strip("\0 ") if value else ""


def _short(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]


def _default_connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn
