"""Delivery of signed reports back to the site, through a durable outbox with retries.

One interface, small implementations (the shape of huey's storage backends):

- ``sr``: a DICOM Basic Text SR, C-STOREd to the site PACS (``reports.deliver_to``);
- ``pdf``: a DICOM Encapsulated PDF of the printable report, C-STOREd likewise;
- ``print``: the printable PDF written under ``DATA_DIR/reports/print/`` for a
  site on paper (a USB stick, a print share).

Signing a report final queues one ``deliveries`` row per configured format in
the same transaction as the signature (so a signed report is never left
without its deliveries).  The worker's sweep takes due rows under a lease,
sends them, and records the outcome: on failure the next attempt is set with
a doubling delay capped at ``reports.retry_max_backoff_s``; the row is retried
until the site accepts it.  A worker killed mid-send leaves a lease that runs
out, and the row is sent again with the *same* SOP Instance UID (chosen when
the row was queued), so the PACS ends up with one copy.  When every delivery
of a read item's final report is accepted, the item goes ``final → delivered``.

This module's ``sweep(cfg)`` is listed in ``appliance.tasks.SWEEP_MODULES``;
it also runs the critical-finding escalations, which have the same rhythm.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from appliance.core import audit, db, durable
from appliance.reports import critical_findings
from appliance.reports import documents as report_documents
from appliance.reports import model as reports

log = logging.getLogger("appliance.report_delivery")

BASE_BACKOFF_S = 5.0
LEASE_S = 120.0  # longer than the worst C-STORE: 10 s association + 30 s DIMSE + margin
BATCH = 20
SWEEP_BUDGET_S = 30.0  # wall time one sweep spends sending
DICOM_TIMEOUT_S = 10.0
PRINT_DESTINATION = "print"
SYSTEM_ACTOR = "system:report-delivery"


class DeliveryFailed(Exception):
    """The site did not accept the document; the message is kept on the row as last_error.

    ``unreachable`` means no association was made: the other rows for the same
    destination wait for the next sweep instead of each waiting for a timeout.
    """

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


@dataclass
class Job:
    """One delivery row with everything needed to make and send its document."""

    row: dict[str, Any]
    doc: report_documents.SignedReport
    cfg: Any


class Backend(Protocol):
    format: str

    def send(self, job: Job) -> str:
        """Deliver the document; return a short note; raise DeliveryFailed if not accepted."""


# -- DICOM C-STORE ------------------------------------------------------------------------
def c_store(ds: Dataset, calling_ae: str, called_ae: str, host: str, port: int,
            timeout: float = DICOM_TIMEOUT_S) -> int:
    """Send one dataset with pynetdicom's SCU; return the DIMSE status or raise DeliveryFailed."""
    from pynetdicom import AE, evt

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.network_timeout = timeout
    ae.dimse_timeout = timeout * 3

    def nodelay(event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    assoc = ae.associate(host, port, ae_title=called_ae,
                         evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
    if not assoc.is_established:
        why = ("rejected the association" if assoc.is_rejected else
               "aborted the association" if assoc.is_aborted else "did not answer")
        raise DeliveryFailed(f"{called_ae} at {host}:{port} {why}",
                             unreachable=not assoc.is_rejected)
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise DeliveryFailed(f"{called_ae} sent no C-STORE response (connection lost)")
    code = int(status.Status)
    if code == 0x0000 or code in (0xB000, 0xB006, 0xB007):  # success or warning: stored
        return code
    comment = status.get("ErrorComment", "")
    raise DeliveryFailed(f"{called_ae} refused the report: status 0x{code:04X} {comment}".strip())


class DicomBackend:
    """C-STORE a document to the configured site PACS."""

    def __init__(self, format: str):
        self.format = format

    def build(self, job: Job) -> Dataset:
        if self.format == "sr":
            return report_documents.build_sr(job.doc)
        return report_documents.build_encapsulated_pdf(job.doc,
                                                       report_documents.render_pdf(job.doc))

    def send(self, job: Job) -> str:
        name = job.row["destination"]
        peer = job.cfg.known_ae(name)
        if peer is None or not peer.host:
            raise DeliveryFailed(f"{name} is not a known AE with a host (appliance ae add {name}"
                                 " --host H --port P)")
        ds = self.build(job)
        if getattr(peer, "commitment", False):  # delivered means committed (forwarding's SCU)
            return _committed_store(job.cfg, ds, peer)
        code = c_store(ds, job.cfg["dicom"]["ae_title"], name, peer.host, peer.port)
        return f"stored on {name} (status 0x{code:04X})"


def _committed_store(cfg: Any, ds: Dataset, peer: Any) -> str:
    """Committed already: delivered. Otherwise store, ask for commitment, and retry later."""
    from appliance.forwarding import commitment
    from dicom_node.store_scu import AssociationFailed

    if commitment.is_committed(cfg, peer.name, str(ds.SOPInstanceUID)):
        return f"committed by {peer.name} (storage commitment)"
    try:
        note = commitment.store_and_ask(cfg, ds, peer)
    except AssociationFailed as e:
        raise DeliveryFailed(str(e), unreachable=e.unreachable) from None
    raise DeliveryFailed(f"{peer.name}: {note}; awaiting storage commitment")


class PrintBackend:
    """Write the printable PDF into ``DATA_DIR/reports/print/`` (durably, atomically)."""

    format = "print"

    def send(self, job: Job) -> str:
        folder = Path(job.cfg.data_dir) / "reports" / "print"
        durable.ensure_dir(folder)
        path = folder / print_file_name(job.doc)
        try:
            durable.atomic_write(path, report_documents.render_pdf(job.doc), mode=0o600)
        except OSError as e:
            raise DeliveryFailed(f"could not write {path}: {e.strerror}") from None
        return f"written to {path}"


def print_file_name(doc: report_documents.SignedReport) -> str:
    label = (doc.study.get("accession_number") or doc.study.get("patient_id") or "study")
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[:40]
    return f"{safe}-report{doc.report['id']}-{doc.version['level']}.pdf"


BACKENDS: dict[str, Backend] = {
    "sr": DicomBackend("sr"),
    "pdf": DicomBackend("pdf"),
    "print": PrintBackend(),
}


# -- the outbox --------------------------------------------------------------------------------
def backoff_s(attempts: int, cap: float) -> float:
    """Delay before the next try after ``attempts`` failures: 5 s, 10 s, 20 s … at most ``cap``."""
    return min(float(cap), BASE_BACKOFF_S * (2 ** max(0, attempts - 1)))


def enqueue(conn: sqlite3.Connection, cfg: Any, version_id: int,
            now: float | None = None) -> list[int]:
    """Queue the deliveries of a final version (one per format); safe to call twice.

    Runs inside the caller's transaction when there is one (the signature's).
    """
    t = now if now is not None else time.time()
    version = reports.get_version(conn, version_id)
    if version["level"] != "final":
        return []
    report = reports.get_report(conn, version["report_id"])
    settings = cfg["reports"]
    ids = []
    for fmt in settings["formats"]:
        destination = PRINT_DESTINATION if fmt == "print" else settings["deliver_to"]
        if not destination:
            continue  # no site PACS configured: the printable page is the way back
        cur = conn.execute(
            "INSERT OR IGNORE INTO deliveries (version_id, report_id, read_item_id, format,"
            " destination, series_uid, sop_uid, next_attempt_at, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (version_id, report["id"], report["read_item_id"], fmt, destination, generate_uid(),
             generate_uid(), t, t))
        if cur.rowcount:
            ids.append(cur.lastrowid)
    return ids


def enqueue_handback(conn: sqlite3.Connection, destination: str, since: float = 0.0,
                     now: float | None = None) -> list[int]:
    """Return to service: every final version signed here since ``since`` (reports and
    addenda) queued as an SR to ``destination``, once each (``UNIQUE (version, format,
    destination)``: a version already queued or delivered there keeps its row and its UIDs,
    so a second hand-back sends nothing twice). Returns the ids of all those rows."""
    t = time.time() if now is None else now
    with db.transaction(conn):
        versions = conn.execute(
            "SELECT v.id, v.report_id, r.read_item_id FROM report_versions v JOIN reports r"
            " ON r.id = v.report_id WHERE v.level = 'final' AND v.signed_at >= ? ORDER BY v.id",
            (since,)).fetchall()
        for v in versions:
            conn.execute(
                "INSERT OR IGNORE INTO deliveries (version_id, report_id, read_item_id, format,"
                " destination, series_uid, sop_uid, next_attempt_at, created_at)"
                " VALUES (?,?,?,'sr',?,?,?,?,?)",
                (v["id"], v["report_id"], v["read_item_id"], destination, generate_uid(),
                 generate_uid(), t, t))
        return [r[0] for r in conn.execute(
            "SELECT d.id FROM deliveries d JOIN report_versions v ON v.id = d.version_id"
            " WHERE d.format = 'sr' AND d.destination = ? AND v.level = 'final'"
            " AND v.signed_at >= ? ORDER BY d.id", (destination, since))]


def handback_rows(conn: sqlite3.Connection, ids: list[int]) -> list[dict[str, Any]]:
    """The hand-back's report documents: study, series and SOP Instance UID of each SR, the
    signed version's SHA-256, its kind (report or addendum) and delivery state."""
    if not ids:
        return []
    return [dict(r) for r in conn.execute(
        "SELECT d.id, d.report_id, r.kind, r.study_uid, d.series_uid, d.sop_uid, d.state,"
        " d.last_error, v.sha256 FROM deliveries d JOIN reports r ON r.id = d.report_id"
        f" JOIN report_versions v ON v.id = d.version_id WHERE d.id IN ({','.join('?' * len(ids))})"
        " ORDER BY d.id", ids)]


def make_due(conn: sqlite3.Connection, ids: list[int], now: float | None = None,
             again: bool = False) -> None:
    """Rows among ``ids`` due now (the hand-back is waiting for them); with ``again``,
    delivered ones too (the PACS no longer holds them: same SOP Instance UID, sent again)."""
    t = time.time() if now is None else now
    with db.transaction(conn):
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            conn.execute("UPDATE deliveries SET next_attempt_at = ?, state = 'pending',"
                         " delivered_at = NULL WHERE (state = 'pending' OR ?)"
                         f" AND id IN ({','.join('?' * len(chunk))})", (t, int(again), *chunk))


DICOM_FORMATS = ("sr", "pdf")


def sent_documents(conn: sqlite3.Connection, study_uids: list[str]) -> list[dict[str, Any]]:
    """The DICOM documents (SR, Encapsulated PDF) of these studies' reports that a PACS may
    hold: delivered, or tried (a document stored but not yet committed counts).  Each with
    its delivery id, destination, study, series and SOP Instance UID."""
    out: list[dict[str, Any]] = []
    uids = list(dict.fromkeys(study_uids))
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        out += [dict(r) for r in conn.execute(
            "SELECT d.id, d.destination, r.study_uid, d.series_uid, d.sop_uid FROM deliveries d"
            " JOIN reports r ON r.id = d.report_id WHERE d.format IN ('sr', 'pdf')"
            " AND (d.state = 'delivered' OR d.attempts > 0)"
            f" AND r.study_uid IN ({','.join('?' * len(chunk))}) ORDER BY d.id", chunk)]
    return out


def delivered_documents(conn: sqlite3.Connection, destination: str,
                        sop_uids: list[str]) -> set[str]:
    """Which of these documents' SOP Instance UIDs are delivered (since last queued) there."""
    out: set[str] = set()
    for i in range(0, len(sop_uids), 500):
        chunk = sop_uids[i:i + 500]
        out |= {r[0] for r in conn.execute(
            "SELECT sop_uid FROM deliveries WHERE destination = ? AND state = 'delivered' AND"
            f" sop_uid IN ({','.join('?' * len(chunk))})", (destination, *chunk))}
    return out


def for_report(conn: sqlite3.Connection, report_id: int) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(
        "SELECT * FROM deliveries WHERE report_id = ? ORDER BY id", (report_id,))]


def for_item(conn: sqlite3.Connection, item_id: int) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(
        "SELECT * FROM deliveries WHERE read_item_id = ? ORDER BY id", (item_id,))]


def _lease_one(conn: sqlite3.Connection, now: float, owner: str,
               skip: set[str]) -> int | None:
    """Take the most overdue row that is pending, due, not leased, and not to a skipped PACS.

    One row at a time, so a lease never runs out while rows before it are
    being sent (a blackholed PACS costs a timeout per row).
    """
    marks = ",".join("?" * len(skip))
    with db.transaction(conn):
        row = conn.execute(
            "SELECT id FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?"
            " AND (lease_until IS NULL OR lease_until <= ?)"
            f" AND destination NOT IN ({marks}) ORDER BY next_attempt_at, id LIMIT 1",
            (now, now, *skip)).fetchone()
        if row is None:
            return None
        conn.execute("UPDATE deliveries SET lease_owner=?, lease_until=? WHERE id=?",
                     (owner, now + LEASE_S, row[0]))
    return row[0]


def _study(conn: sqlite3.Connection, study_uid: str) -> dict[str, Any]:
    row = reports.study_row(conn, study_uid)
    if row is None:
        raise DeliveryFailed(f"study {study_uid} is no longer in the index")
    return row


def _evidence(conn: sqlite3.Connection, study_uid: str) -> list[tuple[str, str, str]]:
    return [(r[0], r[1], r[2]) for r in conn.execute(
        "SELECT series_uid, sop_class_uid, sop_uid FROM instances WHERE study_uid = ?"
        " AND sop_class_uid != '' ORDER BY series_uid, instance_number", (study_uid,))]


def _predecessor(conn: sqlite3.Connection, report: dict[str, Any]) -> tuple[str, str, str] | None:
    """The original's delivered SR, which an addendum SR names as its predecessor."""
    if report["kind"] != "addendum" or not report["parent_id"]:
        return None
    r = conn.execute("SELECT series_uid, sop_uid FROM deliveries WHERE report_id = ?"
                     " AND format = 'sr' ORDER BY id LIMIT 1", (report["parent_id"],)).fetchone()
    from pydicom.uid import BasicTextSRStorage

    return (r[0], BasicTextSRStorage, r[1]) if r else None


def _job(conn: sqlite3.Connection, cfg: Any, row: dict[str, Any]) -> Job:
    version = reports.get_version(conn, row["version_id"])
    report = reports.get_report(conn, row["report_id"])
    doc = report_documents.SignedReport(
        version=version, report=report, study=_study(conn, report["study_uid"]),
        site_name=cfg["site"]["name"], series_uid=row["series_uid"], sop_uid=row["sop_uid"],
        predecessor=_predecessor(conn, report), evidence=_evidence(conn, report["study_uid"]),
        templates=reports.load_templates(Path(cfg.data_dir) / "report_templates", []))
    return Job(row=row, doc=doc, cfg=cfg)


def attempt(conn: sqlite3.Connection, cfg: Any, delivery_id: int, owner: str,
            now: float) -> str:
    """Send one leased row and record the outcome: ``delivered``, ``failed`` or ``unreachable``."""
    row = dict(conn.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone())
    backend = BACKENDS.get(row["format"])
    try:
        if backend is None:
            raise DeliveryFailed(f"unknown delivery format {row['format']!r}")
        note = backend.send(_job(conn, cfg, row))
    except DeliveryFailed as e:
        _failed(conn, cfg, row, owner, str(e), now)
        return "unreachable" if e.unreachable else "failed"
    except (reports.ReportError, OSError) as e:
        _failed(conn, cfg, row, owner, str(e), now)
        return "failed"
    except Exception as e:  # a bug must not stop the other deliveries; it is retried too
        log.exception("delivery %s failed unexpectedly", delivery_id)
        _failed(conn, cfg, row, owner, f"internal error: {type(e).__name__}: {e}", now)
        return "failed"
    _delivered(conn, row, owner, note, now)
    return "delivered"


def _failed(conn: sqlite3.Connection, cfg: Any, row: dict[str, Any], owner: str, error: str,
            now: float) -> None:
    attempts = row["attempts"] + 1
    next_at = now + backoff_s(attempts, cfg["reports"]["retry_max_backoff_s"])
    with db.transaction(conn):
        cur = conn.execute(
            "UPDATE deliveries SET attempts=?, next_attempt_at=?, last_error=?, lease_owner=NULL,"
            " lease_until=NULL WHERE id=? AND lease_owner=? AND state='pending'",
            (attempts, next_at, error[:500], row["id"], owner))
        if cur.rowcount:
            audit.record(conn, SYSTEM_ACTOR, "report.deliver", f"delivery:{row['id']}",
                         outcome="failed", ts=now,
                         detail={"report_id": row["report_id"], "format": row["format"],
                                 "destination": row["destination"], "attempt": attempts,
                                 "error": error[:200], "retry_in_s": round(next_at - now)})
    log.warning("report delivery %s (%s to %s) failed, attempt %s: %s", row["id"], row["format"],
                row["destination"], attempts, error)


def _delivered(conn: sqlite3.Connection, row: dict[str, Any], owner: str, note: str,
               now: float) -> None:
    with db.transaction(conn):
        cur = conn.execute(
            "UPDATE deliveries SET state='delivered', attempts=attempts+1, delivered_at=?,"
            " last_error='', lease_owner=NULL, lease_until=NULL WHERE id=? AND state='pending'",
            (now, row["id"]))
        if not cur.rowcount:
            return
        audit.record(conn, SYSTEM_ACTOR, "report.deliver", f"delivery:{row['id']}", ts=now,
                     detail={"report_id": row["report_id"], "format": row["format"],
                             "destination": row["destination"], "sop_uid": row["sop_uid"],
                             "note": note})
        if row["read_item_id"] is not None:
            _item_delivered(conn, row, now)


def _item_delivered(conn: sqlite3.Connection, row: dict[str, Any], now: float) -> None:
    """``final → delivered`` once every delivery of the item's final report is accepted."""
    report = reports.get_report(conn, row["report_id"])
    if report["kind"] != "report":
        return  # an addendum follows a delivered report
    waiting = conn.execute("SELECT COUNT(*) FROM deliveries WHERE version_id = ?"
                           " AND state != 'delivered'", (row["version_id"],)).fetchone()[0]
    if waiting:
        return
    try:
        item_transition(conn, row["read_item_id"], "delivered", SYSTEM_ACTOR, now)
    except reports.ReportError as e:  # e.g. the item was cancelled meanwhile: keep the delivery
        log.warning("read item %s not marked delivered: %s", row["read_item_id"], e)


def item_transition(conn: sqlite3.Connection, item_id: int, state: str, actor: str,
                    now: float) -> bool:
    """Move a read item on the worklist (``appliance.worklist``); False when there is none.

    A refusal (the item is not claimed by the signer, it was cancelled)
    becomes a ReportError with the worklist's HTTP status, so the signature
    it was part of is rolled back with it.
    """
    try:
        from appliance.reading import worklist
    except ModuleNotFoundError as e:
        if e.name != "appliance.worklist":
            raise
        return False
    try:
        if worklist.get_item(conn, item_id)["state"] == state:
            return False
        worklist.transition(conn, item_id, state, actor, now)
    except worklist.NotFound:
        return False
    except worklist.WorklistError as e:
        raise reports.ReportError(str(e), e.status) from None
    return True


def sign(conn: sqlite3.Connection, cfg: Any, report_id: int, *, actor: str, level: str,
         templates: dict[str, reports.Template], source: str = "",
         now: float | None = None) -> int:
    """Sign a report; in the same transaction move its read item and queue its deliveries.

    ``preliminary`` and ``final`` move the read item to the state of the same
    name; a final (report or addendum) queues one delivery per format.
    """
    t = now if now is not None else time.time()

    def after(conn: sqlite3.Connection, report: dict[str, Any], version_id: int) -> None:
        if report["kind"] == "report" and report["read_item_id"] is not None:
            item_transition(conn, report["read_item_id"], level, actor, t)
        if level == "final":
            enqueue(conn, cfg, version_id, t)

    return reports.sign(conn, report_id, actor=actor, level=level, templates=templates,
                        source=source, now=t, on_signed=after)


def run_due(cfg: Any, now: float | None = None, conn: sqlite3.Connection | None = None,
            limit: int = BATCH, budget_s: float = SWEEP_BUDGET_S) -> dict[str, int]:
    """Attempt due deliveries once each; return counts of ``delivered`` and ``failed``.

    Bounded per call (``limit`` rows, ``budget_s`` seconds of wall time) so one
    sweep never blocks the worker for long; what is left is due at the next.
    ``now`` fixes the clock (tests); otherwise each attempt reads the time.
    """
    own = conn is None
    conn = conn or db.connect(cfg.db_path)
    owner = f"{socket.gethostname()}:{os.getpid()}:{generate_uid()[-8:]}"
    counts = {"delivered": 0, "failed": 0}
    unreachable: set[str] = set()
    started = time.monotonic()
    try:
        while sum(counts.values()) < limit and time.monotonic() - started < budget_s:
            t = now if now is not None else time.time()
            delivery_id = _lease_one(conn, t, owner, unreachable)
            if delivery_id is None:
                break
            outcome = attempt(conn, cfg, delivery_id, owner, t)
            if outcome == "unreachable":
                unreachable.add(conn.execute("SELECT destination FROM deliveries WHERE id = ?",
                                             (delivery_id,)).fetchone()[0])
            counts["delivered" if outcome == "delivered" else "failed"] += 1
    finally:
        if own:
            conn.close()
    return counts


def sweep(cfg: Any, now: float | None = None) -> None:
    """The worker's periodic step: critical-finding escalations, then due deliveries."""
    conn = db.connect(cfg.db_path)
    try:
        critical_findings.escalate_due(conn, cfg, now)
        run_due(cfg, now, conn)
    finally:
        conn.close()
