"""QIDO-RS (PS3.18 §10.6): query parameters → SQL over the DICOM index → DICOM JSON.

The index keeps the attributes a PACS worklist and OHIF search on (study,
series and instance rows), so a search never opens a file.  Matching keys may
be given by keyword (``PatientID``) or by tag number (``00100020``, which is
what OHIF's priors lookup sends), with the PS3.4 C.2.2.2 rules: single value,
UID list, ``*``/``?`` wildcards, ``A-B`` date/time ranges, and an empty value
as a universal match.  A valid attribute we do not index is ignored with a
``Warning: 299`` header, as the standard asks; a word that is neither a known
parameter nor an attribute is a 400 with the reason.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

STUDY, SERIES, INSTANCE = "study", "series", "instance"
LEVELS = (STUDY, SERIES, INSTANCE)
MAX_LIMIT = 5000
DEFAULT_LIMIT = {STUDY: 1000, SERIES: 5000, INSTANCE: 5000}
CONTROL_PARAMS = {"limit", "offset", "fuzzymatching", "includefield", "orderby", "_"}


class QueryError(ValueError):
    """A bad query parameter; the message is the 400's reason."""


@dataclass(frozen=True)
class Attr:
    """One indexed attribute: its tag, VR, level and the SQL expression that holds it."""

    keyword: str
    tag: str
    vr: str
    level: str
    column: str


def _attr(keyword: str, level: str, column: str) -> Attr:
    tag = tag_for_keyword(keyword)
    return Attr(keyword, f"{tag:08X}", dictionary_VR(tag), level, column)


ATTRS: tuple[Attr, ...] = (
    _attr("StudyInstanceUID", STUDY, "st.study_uid"),
    _attr("PatientID", STUDY, "st.patient_id"),
    _attr("IssuerOfPatientID", STUDY, "st.issuer_of_patient_id"),
    _attr("PatientName", STUDY, "st.patient_name"),
    _attr("PatientBirthDate", STUDY, "st.patient_birth_date"),
    _attr("PatientSex", STUDY, "st.patient_sex"),
    _attr("PatientAge", STUDY, "st.patient_age"),
    _attr("StudyDate", STUDY, "st.study_date"),
    _attr("StudyTime", STUDY, "st.study_time"),
    _attr("AccessionNumber", STUDY, "st.accession_number"),
    _attr("StudyID", STUDY, "st.study_id"),
    _attr("StudyDescription", STUDY, "st.study_description"),
    _attr("ReferringPhysicianName", STUDY, "st.referring_physician"),
    _attr("InstitutionName", STUDY, "st.institution_name"),
    _attr("ModalitiesInStudy", STUDY, "st.modalities"),
    _attr("NumberOfStudyRelatedSeries", STUDY, "st.num_series"),
    _attr("NumberOfStudyRelatedInstances", STUDY, "st.num_instances"),
    _attr("SeriesInstanceUID", SERIES, "se.series_uid"),
    _attr("Modality", SERIES, "se.modality"),
    _attr("SeriesNumber", SERIES, "se.series_number"),
    _attr("SeriesDescription", SERIES, "se.series_description"),
    _attr("BodyPartExamined", SERIES, "se.body_part"),
    _attr("SeriesDate", SERIES, "se.series_date"),
    _attr("SeriesTime", SERIES, "se.series_time"),
    _attr("NumberOfSeriesRelatedInstances", SERIES, "se.num_instances"),
    _attr("SOPInstanceUID", INSTANCE, "i.sop_uid"),
    _attr("SOPClassUID", INSTANCE, "i.sop_class_uid"),
    _attr("InstanceNumber", INSTANCE, "i.instance_number"),
    _attr("Rows", INSTANCE, "i.rows"),
    _attr("Columns", INSTANCE, "i.columns"),
    _attr("NumberOfFrames", INSTANCE, "i.number_of_frames"),
    _attr("AvailableTransferSyntaxUID", INSTANCE, "i.transfer_syntax"),
)
BY_KEY: dict[str, Attr] = {a.keyword: a for a in ATTRS} | {a.tag: a for a in ATTRS}
# Attributes that are part of the index but must not be used to filter out a study's rows.
_COUNTS = {"NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
           "NumberOfSeriesRelatedInstances"}
_LEVEL_RANK = {STUDY: 0, SERIES: 1, INSTANCE: 2}
_FROM = {
    STUDY: "studies st",
    SERIES: "series se JOIN studies st ON st.study_uid = se.study_uid",
    INSTANCE: ("instances i JOIN series se ON se.series_uid = i.series_uid"
               " JOIN studies st ON st.study_uid = i.study_uid"),
}
_ORDER = {
    STUDY: "st.study_date DESC, st.study_time DESC, st.study_uid",
    SERIES: "se.series_number, se.series_uid",
    INSTANCE: "i.instance_number, i.sop_uid",
}
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


@dataclass
class Query:
    """A parsed QIDO request: SQL pieces plus what to return."""

    level: str
    where: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    include: list[Attr] = field(default_factory=list)
    limit: int = 0
    offset: int = 0
    fuzzy: bool = False
    warnings: list[str] = field(default_factory=list)


def resolve_key(key: str) -> tuple[str, Attr | None]:
    """(keyword, indexed attribute or None) for a keyword or 8-digit tag; QueryError if neither."""
    if _TAG_RE.match(key):
        keyword = keyword_for_tag(int(key, 16))
        if not keyword:
            raise QueryError(f"{key} is not a tag in the DICOM data dictionary")
        return keyword, BY_KEY.get(key.upper())
    if key.split(".")[0] and tag_for_keyword(key.split(".")[0]) is not None:
        return key, BY_KEY.get(key)
    raise QueryError(f"unknown query parameter {key!r} (not a DICOM keyword or tag)")


def parse(level: str, args: Iterable[tuple[str, str]], study_uid: str | None = None,
          series_uid: str | None = None) -> Query:
    """Turn the request's query string into a :class:`Query`; raise QueryError with the reason."""
    q = Query(level=level, limit=DEFAULT_LIMIT[level])
    matches: list[tuple[Attr, str]] = []
    includes: list[str] = []
    for key, value in args:
        if key in CONTROL_PARAMS:
            _control(q, key, value, includes)
            continue
        keyword, attr = resolve_key(key)
        if attr is None:
            q.warnings.append(f"matching on {keyword} is not supported and was ignored")
            continue
        if _LEVEL_RANK[attr.level] > _LEVEL_RANK[level]:
            raise QueryError(f"{keyword} is a {attr.level}-level attribute; "
                             f"it cannot be matched in a {level}-level search")
        if keyword in _COUNTS:
            q.warnings.append(f"matching on {keyword} is not supported and was ignored")
            continue
        matches.append((attr, value))
    if study_uid is not None:
        matches.append((BY_KEY["StudyInstanceUID"], study_uid))
    if series_uid is not None:
        matches.append((BY_KEY["SeriesInstanceUID"], series_uid))
    for attr, value in matches:
        _match(q, attr, value)
    q.include = _returned(level, includes, q, study_uid is None, series_uid is None)
    return q


def _control(q: Query, key: str, value: str, includes: list[str]) -> None:
    if key in ("limit", "offset"):
        try:
            n = int(value)
        except ValueError:
            raise QueryError(f"{key} must be a whole number, got {value!r}") from None
        if n < 0:
            raise QueryError(f"{key} must not be negative, got {n}")
        if key == "limit":
            q.limit = min(n, MAX_LIMIT) if n else q.limit
        else:
            q.offset = n
    elif key == "fuzzymatching":
        if value.lower() not in ("true", "false"):
            raise QueryError(f"fuzzymatching must be true or false, got {value!r}")
        q.fuzzy = value.lower() == "true"
    elif key == "includefield":
        includes.extend(v.strip() for v in value.split(",") if v.strip())


def _returned(level: str, includes: list[str], q: Query, with_study: bool,
              with_series: bool) -> list[Attr]:
    """The attributes each result carries: its level's, its parents' identifiers, includefield."""
    rank = _LEVEL_RANK[level]
    wanted = [a for a in ATTRS if a.level == level]
    parents = [a for a in ATTRS if _LEVEL_RANK[a.level] < rank]
    if "all" in includes:
        wanted = parents + wanted
    else:
        keep = {"StudyInstanceUID", "SeriesInstanceUID"}
        if level != STUDY and with_study:  # searches across studies show whose study it is
            keep |= {"PatientID", "PatientName", "StudyDate", "AccessionNumber"}
        if level == INSTANCE and with_series:
            keep |= {"Modality", "SeriesNumber"}
        for name in includes:
            keyword, attr = resolve_key(name)
            if attr is None:
                q.warnings.append(f"includefield {keyword} is not available in search results")
            else:
                keep.add(attr.keyword)
        wanted = [a for a in parents if a.keyword in keep] + wanted
    return wanted


def _match(q: Query, attr: Attr, value: str) -> None:
    value = value.strip()
    if value == "" or value == "*":
        return  # universal match
    col = attr.column
    if attr.vr == "UI":
        uids = [u.strip() for u in re.split(r"[,\\]", value) if u.strip()]
        bad = [u for u in uids if not _UID_RE.match(u) or len(u) > 64]
        if bad:
            raise QueryError(f"{attr.keyword}: {bad[0]!r} is not a valid UID")
        q.where.append(f"{col} IN ({', '.join('?' for _ in uids)})")
        q.params.extend(uids)
    elif attr.vr in ("DA", "TM", "DT"):
        _match_range(q, attr, value)
    elif attr.vr in ("IS", "US", "UL", "SL", "SS"):
        try:
            q.where.append(f"{col} = ?")
            q.params.append(int(value))
        except ValueError:
            raise QueryError(f"{attr.keyword} must be a whole number, got {value!r}") from None
    elif attr.keyword == "ModalitiesInStudy":
        mods = [m.strip() for m in re.split(r"[,\\]", value) if m.strip()]
        q.where.append("(" + " OR ".join(f"('\\' || {col} || '\\') LIKE ?" for _ in mods) + ")")
        q.params.extend(f"%\\{_like_escape(m)}\\%" for m in mods)
    elif attr.vr == "PN":
        _match_name(q, col, value)
    elif "*" in value or "?" in value:
        q.where.append(f"{col} GLOB ?")
        q.params.append(value.replace("[", "[[]"))
    else:
        q.where.append(f"{col} = ?")
        q.params.append(value)


def _match_range(q: Query, attr: Attr, value: str) -> None:
    pattern = _DATE_RE if attr.vr == "DA" else _TIME_RE if attr.vr == "TM" else re.compile(r"^\d+")
    parts = value.split("-") if attr.vr != "DT" else value.split("-", 1)
    if len(parts) > 2:
        raise QueryError(f"{attr.keyword}: {value!r} is not a value or a range A-B")
    for p in parts:
        if p and not pattern.match(p):
            kind = {"DA": "a date YYYYMMDD", "TM": "a time HHMMSS"}.get(attr.vr, "a date-time")
            raise QueryError(f"{attr.keyword}: {p!r} is not {kind}")
    col = attr.column
    if len(parts) == 1:
        q.where.append(f"{col} = ?" if attr.vr == "DA" else f"{col} LIKE ?")
        q.params.append(parts[0] if attr.vr == "DA" else parts[0] + "%")
        return
    low, high = parts
    if low:
        q.where.append(f"{col} >= ?")
        q.params.append(low)
    if high:
        q.where.append(f"({col} <= ? OR {col} LIKE ?)")
        q.params.extend([high, high + "%"])
    q.where.append(f"{col} != ''")


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _match_name(q: Query, col: str, value: str) -> None:
    """Person names match case-insensitively; fuzzy matching also matches any name part."""
    like = _like_escape(value).replace("*", "%").replace("?", "_")
    if q.fuzzy:
        q.where.append(f"({col} LIKE ? ESCAPE '\\' OR {col} LIKE ? ESCAPE '\\'"
                       f" OR {col} LIKE ? ESCAPE '\\')")
        q.params.extend([like + "%", "%^" + like + "%", "% " + like + "%"])
    else:
        q.where.append(f"{col} LIKE ? ESCAPE '\\'")
        q.params.append(like)


def run(conn: sqlite3.Connection, q: Query, base_url: str,
        sites: list[str] | None = None,
        scope: tuple[str, list[Any]] | None = None) -> list[dict[str, Any]]:
    """Execute the query and return DICOM JSON objects (PS3.18 F.2).

    ``sites``: institution names a site-scoped user may see (None: all).
    ``scope``: an SQL condition on ``st.study_uid`` and its parameters, from
    ``appliance.accounts.permissions.scope_sql`` (who may see which study).
    """
    where, params = list(q.where), list(q.params)
    if scope is not None:
        where.append(scope[0])
        params.extend(scope[1])
    if sites is not None:
        marks = ", ".join("?" for _ in sites)
        where.append(f"lower(st.institution_name) IN ({marks})" if sites else "0")
        params.extend(s.lower() for s in sites)
    cols = ", ".join(f"{a.column} AS c{i}" for i, a in enumerate(q.include))
    ids = {STUDY: "st.study_uid", SERIES: "se.series_uid", INSTANCE: "i.sop_uid"}
    extra = ", st.study_uid AS _st" + (", se.series_uid AS _se" if q.level != STUDY else "")
    extra += f", {ids[q.level]} AS _id"
    sql = (f"SELECT {cols}{extra} FROM {_FROM[q.level]}"
           + (f" WHERE {' AND '.join(where)}" if where else "")
           + f" ORDER BY {_ORDER[q.level]} LIMIT ? OFFSET ?")
    out = []
    for row in conn.execute(sql, (*params, q.limit, q.offset)):
        obj = {a.tag: element(a.vr, row[f"c{i}"], a.keyword) for i, a in enumerate(q.include)}
        obj["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
        obj["00081190"] = {"vr": "UR", "Value": [_retrieve_url(base_url, q.level, row)]}
        out.append(dict(sorted(obj.items())))
    return out


def _retrieve_url(base: str, level: str, row: sqlite3.Row) -> str:
    url = f"{base}/studies/{row['_st']}"
    if level != STUDY:
        url += f"/series/{row['_se']}"
    if level == INSTANCE:
        url += f"/instances/{row['_id']}"
    return url


def element(vr: str, value: Any, keyword: str = "") -> dict[str, Any]:
    """One DICOM JSON attribute; empty values carry only the VR (PS3.18 F.2.5)."""
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(v)} for v in str(value).split("\\")]}
    if vr in ("IS", "US", "UL", "SL", "SS"):
        return {"vr": vr, "Value": [int(value)]}
    if vr in ("CS", "UI") and "\\" in str(value):
        return {"vr": vr, "Value": str(value).split("\\")}
    return {"vr": vr, "Value": [str(value)]}
