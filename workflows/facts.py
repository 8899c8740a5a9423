"""The study attributes a workflow looks at, from index rows or from DICOM headers.

The appliance hands index rows (``studies`` and ``series``) for stored studies;
``appliance workflow explain --dicom-dir`` hands parsed headers of files not
yet stored.  Both end as the same :class:`~workflows.engine.StudyFacts`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from workflows.engine import StudyFacts

AGE_RE = re.compile(r"^(\d{1,3})\s*([DWMY])$", re.IGNORECASE)
AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _date(text: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(text.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def age_years(patient_age: str, birth_date: str, on: str | dt.date | None) -> float | None:
    """PatientAge ("045Y", "006M") wins; else birth date to the study date (or ``on``)."""
    m = AGE_RE.match((patient_age or "").strip())
    if m:
        return int(m.group(1)) * AGE_UNITS[m.group(2).upper()]
    born = _date(birth_date or "")
    when = _date(on) if isinstance(on, str) else on
    if born is None or when is None or when < born:
        return None
    return (when - born).days / 365.25


def from_index(study: Mapping[str, Any], series: Iterable[Mapping[str, Any]]) -> StudyFacts:
    """Facts of a stored study from its ``studies`` row and its ``series`` rows."""
    series = list(series)
    modalities = _unique([s["modality"] for s in series] +
                         (study.get("modalities") or "").split("\\"))
    on = study.get("study_date") or dt.date.fromtimestamp(study["first_received"])
    return StudyFacts(
        study_uid=study["study_uid"],
        modalities=modalities,
        body_parts=_unique(s["body_part"] for s in series),
        study_description=study.get("study_description") or "",
        series_descriptions=_unique(s["series_description"] for s in series),
        calling_ae=(study.get("calling_ae") or "").strip(),
        institution=study.get("institution_name") or "",
        age_years=age_years(study.get("patient_age") or "", study.get("patient_birth_date") or "",
                            on),
        received_at=float(study["first_received"]),
    )


def from_dicom_dir(path: Path, calling_ae: str = "", received_at: float = 0.0
                   ) -> dict[str, StudyFacts]:
    """Facts of every study found in a directory of DICOM files (headers only)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    studies: dict[str, dict[str, Any]] = {}
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        uid = str(ds.get("StudyInstanceUID", "")).strip()
        if not uid:
            continue
        entry = studies.setdefault(uid, {"ds": ds, "series": {}})
        entry["series"][str(ds.get("SeriesInstanceUID", ""))] = {
            "modality": str(ds.get("Modality", "") or ""),
            "body_part": str(ds.get("BodyPartExamined", "") or ""),
            "series_description": str(ds.get("SeriesDescription", "") or ""),
        }
    out = {}
    for uid, entry in studies.items():
        ds = entry["ds"]
        study = {
            "study_uid": uid, "modalities": "",
            "study_description": str(ds.get("StudyDescription", "") or ""),
            "calling_ae": calling_ae, "institution_name": str(ds.get("InstitutionName", "") or ""),
            "patient_age": str(ds.get("PatientAge", "") or ""),
            "patient_birth_date": str(ds.get("PatientBirthDate", "") or ""),
            "study_date": str(ds.get("StudyDate", "") or ""), "first_received": received_at,
        }
        out[uid] = from_index(study, entry["series"].values())
    return out


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        v = (v or "").strip()
        if v and v not in out:
            out.append(v)
    return tuple(out)
