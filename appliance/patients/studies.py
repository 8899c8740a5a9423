"""Orders meet studies: each study that arrives is linked to its order, or flagged.

A scanner that took its patient from the worklist sends the Study Instance UID and the
Accession Number we handed out; the study is linked to that order (the UID first, then
the accession).  A study with neither is flagged ``unordered``; a linked study whose
patient fields (ID, name, birth date, sex) disagree with the order's patient is flagged
``mismatch`` with what differs, before it is read: a typed name on the console is where
identity errors come from.

The worker's sweep does this for studies that are new or received more since they were
checked; running it twice changes nothing.  Readers and staff see the result through
:func:`study_order` (the report page) and :func:`flagged` (the desk).
"""

from __future__ import annotations

import json
import sqlite3
import unicodedata
from typing import Any

from appliance.core import config, db

BATCH = 500


def _norm_name(name: str) -> str:
    """Names compared as a person would: case, accents, spaces and empty components aside."""
    text = unicodedata.normalize("NFKD", name or "").encode("ascii", "ignore").decode()
    return "^".join(p.strip().upper() for p in text.split("^") if p.strip())


def differences(study: sqlite3.Row | dict, order: sqlite3.Row | dict) -> dict[str, list[str]]:
    """Patient fields of the study that disagree with its order's patient: {field: [study, order]}."""
    out = {}
    if (study["patient_id"] or "").strip() != order["patient_id"]:
        out["patient_id"] = [study["patient_id"], order["patient_id"]]
    if _norm_name(study["patient_name"]) != _norm_name(order["name"]):
        out["patient_name"] = [study["patient_name"], order["name"]]
    for field, theirs in (("patient_birth_date", "birth_date"), ("patient_sex", "sex")):
        if study[field] and order[theirs] and study[field].strip() != order[theirs]:
            out[field] = [study[field], order[theirs]]
    return out


def _order_of(conn: sqlite3.Connection, study: sqlite3.Row) -> sqlite3.Row | None:
    sql = ("SELECT o.id, p.patient_id, p.name, p.birth_date, p.sex FROM orders o"
           " JOIN patients p ON p.id = o.patient_ref WHERE o.{} = ?")
    row = conn.execute(sql.format("study_uid"), (study["study_uid"],)).fetchone()
    if row is None and study["accession_number"]:
        row = conn.execute(sql.format("accession"), (study["accession_number"],)).fetchone()
    return row


def check(conn: sqlite3.Connection, limit: int = BATCH) -> dict[str, int]:
    """Link or flag studies new or changed since last checked; counts by flag."""
    studies = conn.execute(
        "SELECT s.study_uid, s.patient_id, s.patient_name, s.patient_birth_date,"
        " s.patient_sex, s.accession_number, s.last_received FROM studies s"
        " LEFT JOIN order_studies os ON os.study_uid = s.study_uid"
        " WHERE os.study_uid IS NULL OR os.checked_at < s.last_received"
        " ORDER BY s.last_received LIMIT ?", (limit,)).fetchall()
    counts = {"linked": 0, "unordered": 0, "mismatch": 0}
    for study in studies:
        order = _order_of(conn, study)
        diff = differences(study, order) if order is not None else {}
        flag = "unordered" if order is None else ("mismatch" if diff else "linked")
        with db.transaction(conn):
            conn.execute(
                "INSERT INTO order_studies (study_uid, order_id, flag, detail, checked_at)"
                " VALUES (?,?,?,?,?) ON CONFLICT(study_uid) DO UPDATE SET"
                " order_id = excluded.order_id, flag = excluded.flag, detail = excluded.detail,"
                " checked_at = excluded.checked_at",
                (study["study_uid"], order["id"] if order else None, flag,
                 json.dumps(diff, sort_keys=True), study["last_received"]))
        counts[flag] += 1
    return counts


def study_order(conn: sqlite3.Connection, study_uid: str) -> dict[str, Any] | None:
    """What a reader needs of a study's order (reason, clinical details) and its flag."""
    row = conn.execute(
        "SELECT os.flag, os.detail, o.accession, o.procedure_name, o.priority, o.reason,"
        " o.clinical_details, o.status FROM order_studies os"
        " LEFT JOIN orders o ON o.id = os.order_id WHERE os.study_uid = ?",
        (study_uid,)).fetchone()
    if row is None:
        return None
    out = dict(row)
    out["differences"] = json.loads(out.pop("detail") or "{}")
    return out


def flagged(conn: sqlite3.Connection, limit: int = 200) -> list[dict[str, Any]]:
    """Studies unordered or disagreeing with their order, newest first (for the desk)."""
    rows = conn.execute(
        "SELECT os.study_uid, os.flag, os.detail, os.checked_at, o.accession,"
        " s.patient_id, s.patient_name, s.accession_number, s.modalities"
        " FROM order_studies os LEFT JOIN orders o ON o.id = os.order_id"
        " LEFT JOIN studies s ON s.study_uid = os.study_uid"
        " WHERE os.flag != 'linked' ORDER BY os.checked_at DESC LIMIT ?", (limit,)).fetchall()
    out = []
    for r in rows:
        item = dict(r)
        item["differences"] = json.loads(item.pop("detail") or "{}")
        out.append(item)
    return out


def sweep(cfg: config.Config, now: float | None = None) -> dict[str, int]:
    """The worker's step: link or flag what arrived since the last pass."""
    conn = db.connect(cfg.db_path)
    try:
        return check(conn)
    finally:
        conn.close()


