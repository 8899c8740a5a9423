"""Storage Commitment results (PS3.4 Annex J) recorded against the forwarding outbox.

After a batch is stored, the sender asks the PACS to commit it (an N-ACTION naming a new
Transaction UID, written on the rows first).  The PACS answers with an N-EVENT-REPORT on
the same association or, later, on one it opens to our DICOM node (which hands the report
here: ``dicom_node`` never imports the appliance).  Committed instances become
``delivered`` with proof ``commitment``; failed ones wait to be sent again.  A request left
unanswered for ``forwarding.commit_wait_s`` is sent again with its instances.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.core import audit, db
from appliance.core.config import Config
from appliance.forwarding import outbox
from dicom_node import store_scu

log = logging.getLogger("appliance.forwarding")


def asked(conn: sqlite3.Connection, destination: str, transaction_uid: str,
          sop_uids: list[str], now: float) -> None:
    """Name the transaction on the stored rows before the request goes (a report may come
    back before ``send_n_action`` returns)."""
    with db.transaction(conn):
        for uid in sop_uids:
            conn.execute("UPDATE forward_outbox SET commit_uid = ?, commit_asked_at = ?"
                         " WHERE destination = ? AND sop_uid = ? AND state = 'stored'",
                         (transaction_uid, now, destination, uid))


def apply(conn: sqlite3.Connection, result: store_scu.CommitmentResult, now: float,
          retry_s: float = 5.0) -> dict[str, int]:
    """Record one report: committed rows delivered, failed rows waiting to be sent again."""
    dest = conn.execute("SELECT destination FROM forward_outbox WHERE commit_uid = ? LIMIT 1",
                        (result.transaction_uid,)).fetchone()
    if dest is None:
        log.warning("storage commitment report for an unknown transaction %s",
                    result.transaction_uid)
        return {"committed": 0, "failed": 0}
    n = outbox.delivered(conn, dest[0], result.committed, "commitment", now,
                         commit_uid=result.transaction_uid)
    with db.transaction(conn):
        for uid, reason in result.failed:
            conn.execute(  # a report document is sent again by report delivery, not here
                "UPDATE forward_outbox SET state = CASE origin WHEN 'report' THEN 'stored'"
                " ELSE 'waiting' END, next_attempt_at = ?,"
                " last_error = ?, commit_uid = NULL, attempts = attempts + 1 WHERE"
                " destination = ? AND sop_uid = ? AND commit_uid = ? AND state = 'stored'",
                (now + retry_s, f"not committed: failure reason 0x{reason:04X}", dest[0], uid,
                 result.transaction_uid))
        audit.record(conn, outbox.ACTOR, "forward.committed", dest[0], source="dicom",
                     outcome="ok" if not result.failed else "failed", ts=now,
                     detail={"transaction_uid": result.transaction_uid, "committed": n,
                             "failed": len(result.failed)})
    return {"committed": n, "failed": len(result.failed)}


def record(cfg: Config, ds: Dataset) -> None:
    """The node's (or the sender's) callback for an N-EVENT-REPORT dataset."""
    conn = db.connect(cfg.db_path)
    try:
        apply(conn, store_scu.parse_report(ds), time.time(), cfg["forwarding"]["retry_min_s"])
    finally:
        conn.close()


def expire(conn: sqlite3.Connection, now: float, wait_s: float) -> int:
    """Rows stored but not proved after ``wait_s``: send them again (and ask again)."""
    with db.transaction(conn):
        return conn.execute(
            "UPDATE forward_outbox SET state = 'waiting', next_attempt_at = ?, commit_uid = NULL,"
            " last_error = 'no proof of storage after the wait; sending again'"
            " WHERE state = 'stored' AND origin != 'report'"
            " AND COALESCE(commit_asked_at, stored_at) <= ?",
            (now, now - wait_s)).rowcount


def accept_reports(ae: Any, handlers: list[tuple], cfg: Config) -> None:
    """Let the DICOM node accept Storage Commitment reports on associations a PACS opens."""
    store_scu.add_report_context(ae)
    handlers.extend(store_scu.report_handlers(lambda ds: record(cfg, ds)))


# -- documents built in memory (signed reports): ``delivered`` means committed ------------------
def is_committed(cfg: Config, destination: str, sop_uid: str) -> bool:
    conn = db.connect(cfg.db_path)
    try:
        r = conn.execute("SELECT state FROM forward_outbox WHERE destination = ? AND sop_uid = ?",
                         (destination, sop_uid)).fetchone()
    finally:
        conn.close()
    return r is not None and r[0] == "delivered"


def store_and_ask(cfg: Config, ds: Dataset, peer: Any, now: float | None = None) -> str:
    """C-STORE a report document and ask the PACS to commit it, on one association.

    The document is tracked in the outbox (origin ``report``) under the request's
    Transaction UID, so the report (on this association or on one the PACS opens to our
    node) marks it delivered; the caller keeps retrying until :func:`is_committed`.
    Returns the C-STORE outcome note; raises AssociationFailed when there is no association.
    """
    t = time.time() if now is None else now
    uid = generate_uid()
    conn = db.connect(cfg.db_path)
    try:
        with db.transaction(conn):
            conn.execute(
                "INSERT INTO forward_outbox (destination, study_uid, sop_uid, priority_rank,"
                " origin, state, next_attempt_at, created_at, stored_at, commit_uid,"
                " commit_asked_at) VALUES (?,?,?,1,'report','stored',?,?,?,?,?)"
                " ON CONFLICT (destination, sop_uid) DO UPDATE SET state = 'stored',"
                " commit_uid = excluded.commit_uid, commit_asked_at = excluded.commit_asked_at"
                " WHERE forward_outbox.state != 'delivered'",
                (peer.name, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), t, t, t, uid, t))
        item = store_scu.Item(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                              ExplicitVRLittleEndian, Path())
        with store_scu.Connection(cfg["dicom"]["ae_title"], peer.name, peer.host, peer.port,
                                  [item], cfg["forwarding"]["timeout_s"], commitment=True,
                                  on_report=lambda report: record(cfg, report)) as link:
            sent = link.send_dataset(ds)
            if sent.outcome == "stored":
                link.request_commitment(uid, [(item.sop_class, item.sop_uid)])
        return sent.note if sent.outcome == "stored" else f"not stored: {sent.note}"
    finally:
        conn.close()
