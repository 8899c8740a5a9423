"""The DICOM index: patients/studies/series/instances rows that C-FIND and QIDO-RS read.

The study store owns these tables (the DDL lives here) and the appliance's
migrations apply them.  Patient attributes are kept on the study row (the
Study Root model most clients use); a Patient Root PATIENT-level query groups
studies by Patient ID.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

SCHEMA_V1 = """
CREATE TABLE studies (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL DEFAULT '',
    issuer_of_patient_id TEXT NOT NULL DEFAULT '',
    patient_name TEXT NOT NULL DEFAULT '',
    patient_birth_date TEXT NOT NULL DEFAULT '',
    patient_sex TEXT NOT NULL DEFAULT '',
    patient_age TEXT NOT NULL DEFAULT '',
    study_date TEXT NOT NULL DEFAULT '',
    study_time TEXT NOT NULL DEFAULT '',
    accession_number TEXT NOT NULL DEFAULT '',
    study_id TEXT NOT NULL DEFAULT '',
    study_description TEXT NOT NULL DEFAULT '',
    referring_physician TEXT NOT NULL DEFAULT '',
    institution_name TEXT NOT NULL DEFAULT '',
    modalities TEXT NOT NULL DEFAULT '',
    num_series INTEGER NOT NULL DEFAULT 0,
    num_instances INTEGER NOT NULL DEFAULT 0,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT ''
);
CREATE INDEX studies_patient_id ON studies(patient_id);
CREATE INDEX studies_patient_name ON studies(patient_name);
CREATE INDEX studies_study_date ON studies(study_date);
CREATE INDEX studies_accession ON studies(accession_number);
CREATE INDEX studies_last_received ON studies(last_received);

CREATE TABLE series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    modality TEXT NOT NULL DEFAULT '',
    series_number INTEGER,
    series_description TEXT NOT NULL DEFAULT '',
    body_part TEXT NOT NULL DEFAULT '',
    series_date TEXT NOT NULL DEFAULT '',
    series_time TEXT NOT NULL DEFAULT '',
    num_instances INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX series_study ON series(study_uid);

CREATE TABLE instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL DEFAULT '',
    instance_number INTEGER,
    transfer_syntax TEXT NOT NULL DEFAULT '',
    rows INTEGER,
    columns INTEGER,
    number_of_frames INTEGER,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    received_at REAL NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    remote_addr TEXT NOT NULL DEFAULT ''
);
CREATE INDEX instances_series ON instances(series_uid);
CREATE INDEX instances_study ON instances(study_uid);

-- Older versions of an instance that was sent again with different bytes:
-- the newer one is served, the older file stays on disk and is listed here.
CREATE TABLE instance_versions (
    id INTEGER PRIMARY KEY,
    sop_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    received_at REAL NOT NULL,
    replaced_at REAL NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT ''
);
CREATE INDEX instance_versions_sop ON instance_versions(sop_uid);
"""

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _text_of(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int_of(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass
class InstanceRecord:
    """What the index keeps of one stored instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    sha256: str
    received_at: float
    calling_ae: str = ""
    remote_addr: str = ""
    study: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    instance: dict[str, Any] = field(default_factory=dict)


def attributes(ds: Dataset, text: Callable[[Dataset, str], str] | None = None,
               integer: Callable[[Dataset, str], int | None] | None = None,
               ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Study, series and instance attributes the index keeps, from a parsed header.

    ``text``/``integer`` read one attribute; the C-STORE path passes readers
    that skip pydicom's value conversion for plain values (study_store.py).
    """
    _text = text or _text_of
    _int = integer or _int_of
    study = {
        "patient_id": _text(ds, "PatientID"),
        "issuer_of_patient_id": _text(ds, "IssuerOfPatientID"),
        "patient_name": _text(ds, "PatientName"),
        "patient_birth_date": _text(ds, "PatientBirthDate"),
        "patient_sex": _text(ds, "PatientSex"),
        "patient_age": _text(ds, "PatientAge"),
        "study_date": _text(ds, "StudyDate"),
        "study_time": _text(ds, "StudyTime"),
        "accession_number": _text(ds, "AccessionNumber"),
        "study_id": _text(ds, "StudyID"),
        "study_description": _text(ds, "StudyDescription"),
        "referring_physician": _text(ds, "ReferringPhysicianName"),
        "institution_name": _text(ds, "InstitutionName"),
    }
    series = {
        "modality": _text(ds, "Modality"),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _text(ds, "SeriesDescription"),
        "body_part": _text(ds, "BodyPartExamined"),
        "series_date": _text(ds, "SeriesDate"),
        "series_time": _text(ds, "SeriesTime"),
    }
    instance = {
        "instance_number": _int(ds, "InstanceNumber"),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "number_of_frames": _int(ds, "NumberOfFrames"),
    }
    return study, series, instance


def lookup(conn: sqlite3.Connection, sop_uid: str) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT sop_uid, path, sha256, size, received_at, calling_ae, series_uid, study_uid "
        "FROM instances WHERE sop_uid = ?",
        (sop_uid,),
    ).fetchone()


def insert(conn: sqlite3.Connection, rec: InstanceRecord) -> None:
    """Index a new instance and update its study and series counters.

    Must run inside a transaction.  Three statements in the common case (a
    further instance of a known series): it runs once per C-STORE inside the
    write lock, so it is kept lean; sqlite3 caches the prepared statements.
    """
    _upsert_study(conn, rec)
    if _upsert_series(conn, rec):
        _count_new_series(conn, rec)
    conn.execute(
        "INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, instance_number,"
        " transfer_syntax, rows, columns, number_of_frames, path, size, sha256, received_at,"
        " calling_ae, remote_addr) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            rec.sop_uid, rec.series_uid, rec.study_uid, rec.sop_class_uid,
            rec.instance.get("instance_number"), rec.transfer_syntax, rec.instance.get("rows"),
            rec.instance.get("columns"), rec.instance.get("number_of_frames"), rec.path,
            rec.size, rec.sha256, rec.received_at, rec.calling_ae, rec.remote_addr,
        ),
    )


def replace(conn: sqlite3.Connection, old: sqlite3.Row, rec: InstanceRecord) -> None:
    """Point the index at a newer version of an instance; remember the older one."""
    conn.execute(
        "INSERT INTO instance_versions (sop_uid, path, size, sha256, received_at, replaced_at,"
        " calling_ae) VALUES (?,?,?,?,?,?,?)",
        (old["sop_uid"], old["path"], old["size"], old["sha256"], old["received_at"],
         rec.received_at, old["calling_ae"]),
    )
    conn.execute(
        "UPDATE instances SET path = ?, size = ?, sha256 = ?, received_at = ?, transfer_syntax = ?,"
        " calling_ae = ?, remote_addr = ? WHERE sop_uid = ?",
        (rec.path, rec.size, rec.sha256, rec.received_at, rec.transfer_syntax, rec.calling_ae,
         rec.remote_addr, rec.sop_uid),
    )
    conn.execute(
        "UPDATE studies SET size_bytes = size_bytes + ? - ?, last_received = max(last_received, ?)"
        " WHERE study_uid = ?",
        (rec.size, old["size"], rec.received_at, old["study_uid"]),
    )
    # A corrected version (identity reconciliation, a PACS re-sending a fix) brings new
    # patient attributes: the study row, which C-FIND and QIDO answer from, follows it.
    conn.execute(
        "UPDATE studies SET " + ", ".join(f"{c} = CASE WHEN ? != '' THEN ? ELSE {c} END"
                                          for c in PATIENT_COLUMNS) + " WHERE study_uid = ?",
        (*[v for c in PATIENT_COLUMNS for v in (rec.study.get(c, ""),) * 2], old["study_uid"]),
    )


PATIENT_COLUMNS = ("patient_id", "issuer_of_patient_id", "patient_name", "patient_birth_date",
                   "patient_sex", "patient_age")
STUDY_COLUMNS = ("patient_id", "issuer_of_patient_id", "patient_name", "patient_birth_date",
                 "patient_sex", "patient_age", "study_date", "study_time", "accession_number",
                 "study_id", "study_description", "referring_physician", "institution_name")

# One statement inserts the study or counts one more instance into it; attributes the
# first instance left empty (e.g. an SR without a description) are filled from later ones.
_UPSERT_STUDY = (
    f"INSERT INTO studies (study_uid, {', '.join(STUDY_COLUMNS)}, num_instances, size_bytes,"
    f" first_received, last_received, calling_ae)"
    f" VALUES (?, {', '.join('?' for _ in STUDY_COLUMNS)}, 1, ?, ?, ?, ?)"
    " ON CONFLICT(study_uid) DO UPDATE SET num_instances = num_instances + 1,"
    " size_bytes = size_bytes + excluded.size_bytes,"
    " last_received = max(last_received, excluded.last_received), "
    + ", ".join(f"{c} = CASE WHEN {c} = '' THEN excluded.{c} ELSE {c} END" for c in STUDY_COLUMNS)
)

SERIES_COLUMNS = ("modality", "series_number", "series_description", "body_part", "series_date",
                  "series_time")

_UPSERT_SERIES = (
    f"INSERT INTO series (series_uid, study_uid, {', '.join(SERIES_COLUMNS)}, num_instances)"
    f" VALUES (?, ?, {', '.join('?' for _ in SERIES_COLUMNS)}, 1)"
    " ON CONFLICT(series_uid) DO UPDATE SET num_instances = num_instances + 1"
    " RETURNING num_instances"
)


def _upsert_study(conn: sqlite3.Connection, rec: InstanceRecord) -> None:
    conn.execute(_UPSERT_STUDY, (
        rec.study_uid, *[rec.study.get(c, "") for c in STUDY_COLUMNS], rec.size,
        rec.received_at, rec.received_at, rec.calling_ae,
    ))


def _upsert_series(conn: sqlite3.Connection, rec: InstanceRecord) -> bool:
    """Insert the series or count one more instance; True when the series is new."""
    rows = conn.execute(_UPSERT_SERIES, (
        rec.series_uid, rec.study_uid, *[rec.series.get(c, "") for c in SERIES_COLUMNS],
    )).fetchall()  # fetchall: the statement must be finished before COMMIT
    return rows[0][0] == 1


def _count_new_series(conn: sqlite3.Connection, rec: InstanceRecord) -> None:
    modality = rec.series.get("modality", "")
    row = conn.execute(
        "SELECT modalities FROM studies WHERE study_uid = ?", (rec.study_uid,)
    ).fetchone()
    mods = [m for m in row[0].split("\\") if m]
    if modality and modality not in mods:
        mods.append(modality)
    conn.execute(
        "UPDATE studies SET num_series = num_series + 1, modalities = ? WHERE study_uid = ?",
        ("\\".join(mods), rec.study_uid),
    )


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Studies, series and instances stored, and their bytes."""
    row = conn.execute(
        "SELECT COUNT(*) AS studies, COALESCE(SUM(num_instances), 0) AS instances,"
        " COALESCE(SUM(size_bytes), 0) AS bytes FROM studies"
    ).fetchone()
    return {"studies": row["studies"], "instances": row["instances"], "bytes": row["bytes"]}


# -- instances a caller has not taken yet ----------------------------------------------------
# A caller (cloud sync) keeps its own ledger of instance versions it has taken: a table or
# view with columns ``sop_uid`` and ``sha256``. These read the index against it.
_LEDGER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


def _not_listed(ledger: str) -> str:
    if not _LEDGER_NAME.match(ledger):
        raise ValueError(f"not a table or view name: {ledger!r}")
    return (f"NOT EXISTS (SELECT 1 FROM {ledger} l WHERE l.sop_uid = i.sop_uid"
            " AND l.sha256 = i.sha256)")


def unlisted_instances(conn: sqlite3.Connection, ledger: str, quiet_before: float | None = None,
                       limit: int | None = None) -> list[sqlite3.Row]:
    """Current instance versions ``ledger`` does not list, of studies last received at or
    before ``quiet_before`` (all when None), by study then path; with the study description."""
    sql = ("SELECT i.study_uid, i.sop_uid, i.sha256, i.path, i.size, i.received_at,"
           " s.study_description FROM instances i JOIN studies s ON s.study_uid = i.study_uid"
           f" WHERE {_not_listed(ledger)}")
    args: tuple = ()
    if quiet_before is not None:
        sql, args = sql + " AND s.last_received <= ?", (quiet_before,)
    sql += " ORDER BY i.study_uid, i.path"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return conn.execute(sql, args).fetchall()


def unlisted_summary(conn: sqlite3.Connection, ledger: str) -> tuple[int, float | None, int]:
    """(count, oldest received_at, bytes) of current instance versions ``ledger`` does not list."""
    r = conn.execute("SELECT COUNT(*), MIN(i.received_at), COALESCE(SUM(i.size), 0)"
                     f" FROM instances i WHERE {_not_listed(ledger)}").fetchone()
    return r[0], r[1], r[2]


def listing_counts(conn: sqlite3.Connection, ledger: str) -> tuple[int, int, int]:
    """(listed nowhere, listed more than once, all) over current instance versions."""
    if not _LEDGER_NAME.match(ledger):
        raise ValueError(f"not a table or view name: {ledger!r}")
    r = conn.execute(
        "SELECT SUM(n = 0), SUM(n > 1), COUNT(*) FROM (SELECT (SELECT COUNT(*) FROM"
        f" {ledger} l WHERE l.sop_uid = i.sop_uid AND l.sha256 = i.sha256) AS n"
        " FROM instances i)").fetchone()
    return r[0] or 0, r[1] or 0, r[2]


def study_instances(conn: sqlite3.Connection, study_uid: str) -> list[sqlite3.Row]:
    """A study's current instances (sop_uid, sha256, path, size), by path."""
    return conn.execute("SELECT sop_uid, sha256, path, size FROM instances WHERE study_uid = ?"
                        " ORDER BY path", (study_uid,)).fetchall()


_SENDING_COLUMNS = ("sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, path, size,"
                    " sha256, (SELECT s.patient_id FROM studies s WHERE s.study_uid ="
                    " instances.study_uid) AS patient_id")


def instances_to_send(conn: sqlite3.Connection, study_uid: str | None = None,
                      sop_uids: list[str] | None = None,
                      received_since: float | None = None) -> list[sqlite3.Row]:
    """Current instances of a study, or those named, or all received since a time, with what a
    C-STORE SCU needs (its SOP class, stored transfer syntax, path under the store and
    SHA-256) and the study's current Patient ID (a proof must find the copy under it), by
    series and number."""
    if received_since is not None:
        return conn.execute(f"SELECT {_SENDING_COLUMNS} FROM instances WHERE received_at >= ?"
                            " ORDER BY study_uid, series_uid, instance_number, sop_uid",
                            (received_since,)).fetchall()
    if study_uid is not None:
        return conn.execute(f"SELECT {_SENDING_COLUMNS} FROM instances WHERE study_uid = ?"
                            " ORDER BY series_uid, instance_number, sop_uid",
                            (study_uid,)).fetchall()
    out: list[sqlite3.Row] = []
    uids = list(sop_uids or [])
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        out += conn.execute(f"SELECT {_SENDING_COLUMNS} FROM instances WHERE sop_uid IN"
                            f" ({','.join('?' * len(chunk))})", chunk).fetchall()
    return out


def patient_ids(conn: sqlite3.Connection, study_uids: list[str]) -> dict[str, str]:
    """Study Instance UID → the Patient ID the index holds for it (studies not stored are left
    out): what a copy of the study's instances sent now would carry."""
    out: dict[str, str] = {}
    uids = list(dict.fromkeys(study_uids))
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        out.update((r[0], r[1]) for r in conn.execute(
            "SELECT study_uid, patient_id FROM studies WHERE study_uid IN"
            f" ({','.join('?' * len(chunk))})", chunk))
    return out
