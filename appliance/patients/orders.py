"""Orders as the DICOM node sees them: the worklist it hands out and the steps scanners report.

:data:`WORKLIST_SQL` is the :class:`dicom_node.worklist.WorklistSource` over our tables
(scheduled and started orders only), with the column names the node documents.
:class:`MppsRecorder` is the node's MPPS callback: IN PROGRESS / COMPLETED /
DISCONTINUED recorded on the order the step names (by Study Instance UID, accession or
step ID from its Scheduled Step Attributes Sequence), audited, idempotent for a repeat.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.core import audit, db
from dicom_node import mpps

log = logging.getLogger("appliance.patients")

WORKLIST_SQL = """
SELECT p.name AS patient_name, p.patient_id AS patient_id, p.issuer AS issuer,
       p.birth_date AS birth_date, p.sex AS sex, p.age AS age,
       CASE WHEN p.temporary = 1 THEN 'TEMPORARY IDENTITY'
            || CASE WHEN p.age_band != '' THEN ', estimated age band ' || p.age_band ELSE '' END
            ELSE '' END AS patient_comments,
       o.accession AS accession, o.study_uid AS study_uid,
       o.accession AS requested_procedure_id, o.procedure_name AS procedure_name,
       o.priority AS priority, o.reason AS reason, o.clinical_details AS clinical_details,
       o.modality AS modality, o.station_ae AS station_ae, o.scheduled_date AS start_date,
       o.scheduled_time AS start_time, o.sps_id AS sps_id,
       CASE o.status WHEN 'in_progress' THEN 'STARTED' ELSE 'SCHEDULED' END AS sps_status
FROM orders o JOIN patients p ON p.id = o.patient_ref
WHERE o.status IN ('scheduled', 'in_progress')
"""

_STATE = {"IN PROGRESS": "in_progress", "COMPLETED": "completed",
          "DISCONTINUED": "discontinued"}
_FINAL = ("completed", "discontinued")


class MppsRecorder:
    """Applies one MPPS report to its order (one connection per node thread)."""

    def __init__(self, db_path: Path, on_event: Callable[[str, dict[str, Any]], None]):
        self.db_path = db_path
        self.on_event = on_event
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = db.connect(self.db_path)
        return conn

    def __call__(self, rep: mpps.StepReport) -> tuple[int, str] | None:
        conn = self._conn()
        with db.transaction(conn):
            return self._create(conn, rep) if rep.action == "create" else self._set(conn, rep)

    def _create(self, conn: sqlite3.Connection, rep: mpps.StepReport) -> tuple[int, str] | None:
        if conn.execute("SELECT 1 FROM orders WHERE mpps_uid = ?", (rep.mpps_uid,)).fetchone():
            return mpps.DUPLICATE_INSTANCE, "this MPPS instance was already created"
        row = _order_for(conn, rep)
        actor = f"dicom:{rep.calling_ae}"
        if row is None:  # an unscheduled procedure: acknowledged, nothing to move
            audit.record(conn, actor, "order.mpps.unscheduled", rep.mpps_uid,
                         detail=_detail(rep))
            return None
        if row["status"] in _FINAL:
            return mpps.PROCESSING_FAILURE, f"order {row['accession']} is already {row['status']}"
        conn.execute("UPDATE orders SET status = 'in_progress', mpps_uid = ?, updated_at = ?"
                     " WHERE id = ?", (rep.mpps_uid, time.time(), row["id"]))
        audit.record(conn, actor, "order.in_progress", row["accession"], detail=_detail(rep))
        return None

    def _set(self, conn: sqlite3.Connection, rep: mpps.StepReport) -> tuple[int, str] | None:
        row = conn.execute("SELECT id, accession, status FROM orders WHERE mpps_uid = ?",
                           (rep.mpps_uid,)).fetchone()
        if row is None:
            return mpps.NO_SUCH_INSTANCE, "no such MPPS instance"
        state = _STATE.get(rep.status, row["status"])
        if row["status"] in _FINAL:
            if state == row["status"]:
                return None  # the same final N-SET again: nothing changes
            return mpps.MAY_NO_LONGER_BE_UPDATED, f"step already {row['status']}"
        if state != row["status"]:
            conn.execute("UPDATE orders SET status = ?, updated_at = ? WHERE id = ?",
                         (state, time.time(), row["id"]))
            audit.record(conn, f"dicom:{rep.calling_ae}", f"order.{state}", row["accession"],
                         detail=_detail(rep))
        return None


def _order_for(conn: sqlite3.Connection, rep: mpps.StepReport) -> sqlite3.Row | None:
    for column, values in (("study_uid", rep.study_uids), ("accession", rep.accessions),
                           ("sps_id", rep.sps_ids)):
        for value in values:
            row = conn.execute(f"SELECT id, accession, status FROM orders WHERE {column} = ?",
                               (value,)).fetchone()
            if row is not None:
                return row
    return None


def _detail(rep: mpps.StepReport) -> dict[str, Any]:
    return {"mpps_uid": rep.mpps_uid, "status": rep.status, "address": rep.address,
            "study_uids": rep.study_uids[:10], "accessions": rep.accessions[:10]}
