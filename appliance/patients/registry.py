"""The registration desk: patients and their orders, typed once here instead of on each console.

In a downtime the hospital system is gone, so the appliance registers patients (a real
identity, or a temporary trauma identity from a site-prefixed sequence) and their orders,
which the DICOM node then hands to scanners as a Modality Worklist.  Everything typed is
checked first: bad input raises :class:`RegistrationError` and writes nothing.

Temporary identities come from ``patient_sequences``: the number is counted up in the
same transaction that inserts the patient, and the table refuses to count down, so an
identity is never issued twice, even after its patient was merged into a real one.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from pydicom.uid import generate_uid

from appliance.core import audit, db

SEXES = ("M", "F", "O", "")
PRIORITIES = ("STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW")
# Estimated age bands for an unconscious casualty: (band, the age a scanner is given).
AGE_BANDS = {"infant": "001Y", "child": "008Y", "adolescent": "015Y", "adult": "040Y",
             "elderly": "075Y", "unknown": ""}
BUILTIN_PROCEDURES = [
    {"code": "CTHEAD", "name": "CT head", "modality": "CT"},
    {"code": "CTCHEST", "name": "CT chest", "modality": "CT"},
    {"code": "CTABDPEL", "name": "CT abdomen and pelvis", "modality": "CT"},
    {"code": "CTCSPINE", "name": "CT cervical spine", "modality": "CT"},
    {"code": "CTTRAUMA", "name": "CT trauma whole body", "modality": "CT"},
    {"code": "CRCHEST", "name": "CR chest", "modality": "CR"},
    {"code": "CRPELVIS", "name": "CR pelvis", "modality": "CR"},
    {"code": "DXLIMB", "name": "DX limb", "modality": "DX"},
    {"code": "USFAST", "name": "US FAST", "modality": "US"},
]
_PN_PART = re.compile(r"^[^\\\x00-\x1f]*$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RegistrationError(ValueError):
    """Input the desk cannot register; nothing was written."""


@dataclass(frozen=True)
class Site:
    """What registration needs from the site configuration."""

    prefix: str  # temporary identities: PREFIX-T0001
    procedures: list[dict[str, str]]

    @classmethod
    def from_config(cls, cfg: Any) -> Site:
        section = cfg["patients"]
        prefix = section["temporary_prefix"] or re.sub(r"[^A-Z0-9]", "", cfg["site"]["id"].upper())[:8]
        return cls(prefix or "SITE", section["procedures"] or BUILTIN_PROCEDURES)

    def procedure(self, code: str) -> dict[str, str]:
        for p in self.procedures:
            if p["code"].upper() == code.strip().upper():
                return p
        known = ", ".join(p["code"] for p in self.procedures)
        raise RegistrationError(f"unknown procedure {code!r} (the site's list: {known})")


# -- checking what was typed --------------------------------------------------------------------
def person_name(text: str) -> str:
    """A DICOM person name from 'FAMILY^GIVEN' or 'Family, Given'; refuses empty or odd input."""
    text = (text or "").strip()
    if "^" not in text and "," in text:
        family, _, given = text.partition(",")
        text = f"{family.strip()}^{given.strip()}"
    if not text or len(text) > 64 or not _PN_PART.match(text) or text.count("^") > 4:
        raise RegistrationError("name: give FAMILY^GIVEN (at most 64 characters, no backslash)")
    return text.upper()


def birth_date(text: str) -> str:
    text = (text or "").strip().replace("-", "")
    if not text:
        return ""
    try:
        day = dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise RegistrationError(f"birth date {text!r}: use YYYY-MM-DD") from None
    if day > dt.date.today() or day.year < 1880:
        raise RegistrationError(f"birth date {text!r} is not a possible birth date")
    return day.strftime("%Y%m%d")


def age(value: Any) -> str:
    """An estimated age in years → DICOM AS (``045Y``)."""
    if value in (None, ""):
        return ""
    try:
        years = int(str(value).strip().rstrip("Yy"))
    except ValueError:
        raise RegistrationError(f"age {value!r}: give whole years, such as 45") from None
    if not 0 <= years <= 130:
        raise RegistrationError(f"age {years}: must be between 0 and 130")
    return f"{years:03d}Y"


def sex(value: str) -> str:
    value = (value or "").strip().upper()[:1]
    if value not in SEXES:
        raise RegistrationError("sex: M, F, O or empty")
    return value


def patient_id_text(value: str) -> str:
    value = (value or "").strip()
    if value and not _ID.match(value):
        raise RegistrationError(f"patient ID {value!r}: letters, digits, '.', '_' or '-', "
                                "at most 64")
    return value


# -- patients --------------------------------------------------------------------------------------
def _next_number(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT last FROM patient_sequences WHERE prefix = ?", (key,)).fetchone()
    number = (row[0] if row else 0) + 1
    conn.execute("INSERT INTO patient_sequences (prefix, last) VALUES (?, ?) ON CONFLICT(prefix)"
                 " DO UPDATE SET last = excluded.last", (key, number))
    return number


def register(conn: sqlite3.Connection, site: Site, *, actor: str, name: str,
             patient_id: str = "", birth: str = "", estimated_age: Any = "",
             sex_code: str = "", source: str = "") -> dict[str, Any]:
    """Register a patient with a real identity; without an ID one is issued (PREFIX-P0001)."""
    fields = {"name": person_name(name), "birth_date": birth_date(birth),
              "age": age(estimated_age), "sex": sex(sex_code)}
    pid = patient_id_text(patient_id)
    with db.transaction(conn):
        if pid and conn.execute("SELECT 1 FROM patients WHERE patient_id = ?", (pid,)).fetchone():
            raise RegistrationError(f"patient ID {pid!r} is already registered")
        if not pid:
            pid = f"{site.prefix}-P{_next_number(conn, site.prefix + '-P'):04d}"
        ref = _insert(conn, actor, pid, temporary=False, **fields)
        audit.record(conn, actor, "patient.register", pid, source=source,
                     detail={"patient": ref})
    return get(conn, ref)


def register_trauma(conn: sqlite3.Connection, site: Site, *, actor: str, sex_code: str = "",
                    age_band: str = "unknown", source: str = "") -> dict[str, Any]:
    """One click: a temporary identity ``PREFIX-T0007`` named ``TRAUMA^T0007``."""
    band = (age_band or "unknown").strip().lower()
    if band not in AGE_BANDS:
        raise RegistrationError(f"age band {age_band!r}: one of {', '.join(AGE_BANDS)}")
    code = sex(sex_code)
    with db.transaction(conn):
        number = _next_number(conn, site.prefix + "-T")
        pid = f"{site.prefix}-T{number:04d}"
        ref = _insert(conn, actor, pid, temporary=True, name=f"TRAUMA^T{number:04d}",
                      birth_date="", age=AGE_BANDS[band], sex=code,
                      age_band="" if band == "unknown" else band)
        audit.record(conn, actor, "patient.trauma", pid, source=source, detail={"patient": ref})
    return get(conn, ref)


def _insert(conn: sqlite3.Connection, actor: str, pid: str, *, temporary: bool, name: str,
            birth_date: str, age: str, sex: str, age_band: str = "") -> int:
    cur = conn.execute(
        "INSERT INTO patients (patient_id, name, birth_date, age, age_band, sex, temporary,"
        " created_at, created_by) VALUES (?,?,?,?,?,?,?,?,?)",
        (pid, name, birth_date, age, age_band, sex, int(temporary), time.time(), actor))
    return int(cur.lastrowid)


def get(conn: sqlite3.Connection, ref: int) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM patients WHERE id = ?", (ref,)).fetchone()
    if row is None:
        raise RegistrationError(f"no patient {ref}")
    return dict(row)


def find(conn: sqlite3.Connection, key: str | int) -> dict[str, Any]:
    """A patient by Patient ID, or by the desk's number."""
    row = conn.execute("SELECT * FROM patients WHERE patient_id = ?", (str(key),)).fetchone()
    if row is None and str(key).isdigit():
        row = conn.execute("SELECT * FROM patients WHERE id = ?", (int(key),)).fetchone()
    if row is None:
        raise RegistrationError(f"no patient {key!r}")
    return dict(row)


def listing(conn: sqlite3.Connection, temporary_only: bool = False,
            limit: int = 500) -> list[dict[str, Any]]:
    where = "WHERE p.temporary = 1 AND p.merged_into IS NULL" if temporary_only else ""
    return [dict(r) for r in conn.execute(
        "SELECT p.*, (SELECT count(*) FROM orders o WHERE o.patient_ref = p.id) AS orders"
        f" FROM patients p {where} ORDER BY p.id DESC LIMIT ?", (limit,))]


# -- orders ------------------------------------------------------------------------------------
def add_order(conn: sqlite3.Connection, site: Site, patient_ref: int, *, actor: str,
              procedure: str, priority: str = "ROUTINE", reason: str = "",
              clinical_details: str = "", station_ae: str = "", modality: str = "",
              scheduled: dt.datetime | None = None, source: str = "") -> dict[str, Any]:
    """Schedule a procedure for a registered patient: accession, Study Instance UID, SPS."""
    proc = site.procedure(procedure)
    priority = (priority or "ROUTINE").strip().upper()
    if priority not in PRIORITIES:
        raise RegistrationError(f"priority {priority!r}: one of {', '.join(PRIORITIES)}")
    station = (station_ae or "").strip()
    if len(station) > 16 or "\\" in station:
        raise RegistrationError(f"station AE {station!r}: at most 16 characters")
    for label, text in (("reason", reason), ("clinical details", clinical_details)):
        if len(text or "") > 1024:
            raise RegistrationError(f"{label}: at most 1024 characters")
    when = scheduled or dt.datetime.now()
    patient = get(conn, patient_ref)
    if patient["merged_into"]:
        raise RegistrationError(f"patient {patient['patient_id']} was merged: order for the "
                                "patient it was merged into")
    now = time.time()
    with db.transaction(conn):
        accession = f"{site.prefix}A{_next_number(conn, site.prefix + '-A'):06d}"[:16]
        cur = conn.execute(
            "INSERT INTO orders (patient_ref, accession, study_uid, sps_id, procedure_code,"
            " procedure_name, modality, priority, reason, clinical_details, station_ae,"
            " scheduled_date, scheduled_time, created_at, created_by, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (patient_ref, accession, generate_uid(), accession, proc["code"], proc["name"],
             (modality or proc["modality"]).strip().upper(), priority, (reason or "").strip(),
             (clinical_details or "").strip(), station, when.strftime("%Y%m%d"),
             when.strftime("%H%M%S"), now, actor, now))
        audit.record(conn, actor, "order.create", accession, source=source,
                     detail={"patient_id": patient["patient_id"], "order": cur.lastrowid})
    return order(conn, int(cur.lastrowid))


def order(conn: sqlite3.Connection, order_id: int) -> dict[str, Any]:
    row = conn.execute(
        "SELECT o.*, p.patient_id, p.name AS patient_name, p.birth_date, p.sex"
        " FROM orders o JOIN patients p ON p.id = o.patient_ref WHERE o.id = ?",
        (order_id,)).fetchone()
    if row is None:
        raise RegistrationError(f"no order {order_id}")
    return dict(row)


def orders_of(conn: sqlite3.Connection, patient_ref: int) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(
        "SELECT * FROM orders WHERE patient_ref = ? ORDER BY id", (patient_ref,))]
