"""Header-only corrected versions of stored instances (IHE Patient Information Reconciliation).

When a temporary identity is joined to the real one, every stored instance of the
study gets a new version whose patient attributes are the corrected ones: the old values
go into an Original Attributes Sequence item (PS3.3 C.12.1, reason CORRECT) and the old
Patient ID into the Other Patient IDs Sequence.  Only the header changes: the pixel data
element is carried over as the bytes it was, never decoded.  The new version is stored
through :class:`StudyStore` like any replaced instance, so the previous file is kept as a
version (``instance_versions``) and the index points at the new one; then the study's
patient columns are set, so C-FIND and QIDO answer the corrected identity at once.

Correcting to the values an instance already has changes nothing (a replay is a no-op).
"""

from __future__ import annotations

import datetime as dt
import io
import sqlite3

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node import index
from dicom_node.study_store import REPLACED, StudyStore

PATIENT_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                    "PatientSex", "PatientAge")
_STUDY_COLUMN = {"PatientID": "patient_id", "IssuerOfPatientID": "issuer_of_patient_id",
                 "PatientName": "patient_name", "PatientBirthDate": "patient_birth_date",
                 "PatientSex": "patient_sex", "PatientAge": "patient_age"}


class CorrectionError(Exception):
    """A stored instance could not be corrected; what was corrected before it stays."""


def studies_of_patient(conn: sqlite3.Connection, patient_id: str) -> list[str]:
    """Study Instance UIDs the index holds under this Patient ID."""
    return [r[0] for r in conn.execute(
        "SELECT study_uid FROM studies WHERE patient_id = ? ORDER BY first_received",
        (patient_id,))]


def corrected(data: bytes, new: dict[str, str], reason: str, system: str,
              when: dt.datetime | None = None) -> bytes | None:
    """The corrected Part 10 bytes of one instance, or None when it already says ``new``."""
    ds = pydicom.dcmread(io.BytesIO(data))
    old = {k: str(ds.get(k, "") or "") for k in new}
    if old == {k: str(v) for k, v in new.items()}:
        return None
    modified = Dataset()
    for keyword, value in old.items():
        setattr(modified, keyword, value)
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([modified])
    item.AttributeModificationDateTime = (when or dt.datetime.now(dt.UTC)).strftime(
        "%Y%m%d%H%M%S")
    item.ModifyingSystem = system[:64]
    item.SourceOfPreviousValues = ""
    item.ReasonForTheAttributeModification = "CORRECT"
    ds.OriginalAttributesSequence = Sequence([*ds.get("OriginalAttributesSequence", []), item])
    if old.get("PatientID") and old["PatientID"] != new.get("PatientID", old["PatientID"]):
        other = Dataset()
        other.PatientID = old["PatientID"]
        other.IssuerOfPatientID = old.get("IssuerOfPatientID", "")
        other.TypeOfPatientID = "TEXT"
        kept = [o for o in ds.get("OtherPatientIDsSequence", [])
                if str(o.get("PatientID", "")) != new.get("PatientID")]
        ds.OtherPatientIDsSequence = Sequence([*kept, other])
    for keyword, value in new.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def correct_study(store: StudyStore, study_uid: str, new: dict[str, str], reason: str,
                  system: str) -> list[str]:
    """Correct every instance of one study; the SOP Instance UIDs given a new version."""
    unknown = set(new) - set(PATIENT_KEYWORDS)
    if unknown:
        raise CorrectionError(f"not patient attributes: {sorted(unknown)}")
    changed = []
    for row in index.study_instances(store.conn, study_uid):
        data = store.path_of(row["path"]).read_bytes()
        fixed = corrected(data, new, reason, system)
        if fixed is None:
            continue
        result = store.store(fixed, calling_ae=system[:16], expected_sop_uid=row["sop_uid"])
        if result.outcome != REPLACED:
            raise CorrectionError(f"{row['sop_uid']}: {result.outcome} {result.comment}")
        changed.append(row["sop_uid"])
    _set_study_patient(store.conn, study_uid, new)
    return changed


def _set_study_patient(conn: sqlite3.Connection, study_uid: str, new: dict[str, str]) -> None:
    """The study row answers C-FIND and QIDO: its patient columns follow the correction."""
    sets = ", ".join(f"{_STUDY_COLUMN[k]} = ?" for k in new)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(f"UPDATE studies SET {sets} WHERE study_uid = ?", (*new.values(), study_uid))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
