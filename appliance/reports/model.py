"""The report model: templates, drafts with autosave, preliminary and final signatures, addenda.

A report belongs to one study (and, normally, to the read item of the worklist
that asked for it).  Its life:

``draft`` (autosaved, any number of revisions)
→ ``preliminary`` (signed: the exact text, reader and time are kept for ever
in ``report_versions``; the reader may still revise towards the final)
→ ``final`` (signed; the row is locked by a trigger: nothing about it can
change again).  A correction after that is an *addendum*: a new linked report
that is itself drafted and signed final.

Autosave uses the report's ``revision`` as an optimistic lock, so a second
browser tab with an older copy gets a conflict instead of silently
overwriting newer text.  Every change is audited in the same transaction as
the change itself, so there is no change without its audit row.

Templates are YAML files (``appliance/reports/templates/*.yaml``, and a site's
own in ``DATA_DIR/report_templates/``) with typed fields: ``choice``,
``text``, ``number``, ``boolean`` and ``aspects`` (the ten MCA regions of the
Alberta Stroke Programme Early CT Score).  Free text (findings, impression)
is always available whatever the template.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from appliance.accounts import users as accounts
from appliance.accounts.roles import READERS
from appliance.core import audit, db

PACKAGE_TEMPLATES = Path(__file__).resolve().parent / "templates"
FIELD_TYPES = ("choice", "text", "number", "boolean", "aspects")
MAX_TEXT = 20_000  # characters of findings or impression; a report, not a book
READER_ROLES = READERS


class ReportError(Exception):
    """A report action that cannot be done; the message is shown to the user as is.

    ``status`` is the HTTP status the web layer answers with (400 bad input,
    403 not yours, 404 no such report, 409 conflicts with the report's state).
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# -- templates ------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    key: str
    label: str
    type: str
    options: tuple[str, ...] = ()
    regions: tuple[tuple[str, str], ...] = ()  # aspects: (code, name)
    required: bool = False
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Template:
    id: str
    title: str
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    fields: tuple[Field, ...] = field(default_factory=tuple)
    source: str = ""

    def field(self, key: str) -> Field | None:
        return next((f for f in self.fields if f.key == key), None)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "fields": [
            {"key": f.key, "label": f.label, "type": f.type, "options": list(f.options),
             "regions": [list(r) for r in f.regions], "required": f.required,
             "min": f.min, "max": f.max} for f in self.fields]}


def _parse_field(raw: Any, where: str) -> Field:
    if not isinstance(raw, dict):
        raise ReportError(f"{where}: each field must be a mapping with key, label, type")
    key, kind = str(raw.get("key", "")), str(raw.get("type", ""))
    if not key.replace("_", "").isalnum():
        raise ReportError(f"{where}: field key {key!r} must be letters, digits or '_'")
    if kind not in FIELD_TYPES:
        raise ReportError(f"{where}: field {key}: type must be one of {', '.join(FIELD_TYPES)}")
    options = tuple(str(o) for o in raw.get("options") or ())
    if kind == "choice" and not options:
        raise ReportError(f"{where}: field {key}: a choice needs options")
    regions = tuple((str(k), str(v)) for k, v in (raw.get("regions") or {}).items())
    if kind == "aspects" and len(regions) != 10:
        raise ReportError(f"{where}: field {key}: ASPECTS needs exactly 10 regions")
    return Field(key=key, label=str(raw.get("label") or key), type=kind, options=options,
                 regions=regions, required=bool(raw.get("required", False)),
                 min=raw.get("min"), max=raw.get("max"))


def parse_template(text: str, source: str) -> Template:
    """One template from YAML text; ReportError naming the file and what is wrong."""
    try:
        doc = YAML(typ="safe").load(text)
    except YAMLError as e:
        raise ReportError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not doc.get("id"):
        raise ReportError(f"{source}: a template needs at least 'id' and 'title'")
    match = doc.get("match") or {}
    fields = tuple(_parse_field(f, f"{source}: fields[{i}]")
                   for i, f in enumerate(doc.get("fields") or ()))
    keys = [f.key for f in fields]
    if len(set(keys)) != len(keys):
        raise ReportError(f"{source}: duplicate field keys")
    return Template(
        id=str(doc["id"]), title=str(doc.get("title") or doc["id"]),
        modalities=tuple(str(m).upper() for m in match.get("modalities") or ()),
        body_parts=tuple(str(b).upper() for b in match.get("body_parts") or ()),
        keywords=tuple(str(k).lower() for k in match.get("keywords") or ()),
        fields=fields, source=source,
    )


def load_templates(site_dir: Path | None = None,
                   problems: list[str] | None = None) -> dict[str, Template]:
    """The shipped templates, then the site's own (same id replaces the shipped one).

    A broken site file must not stop reporting: with ``problems`` given, its
    error is appended there and the file is skipped (the shipped template of
    that id stays in use); without it, the ReportError is raised.
    """
    out: dict[str, Template] = {}
    for folder in (PACKAGE_TEMPLATES, site_dir):
        if folder is None or not Path(folder).is_dir():
            continue
        for path in sorted(Path(folder).glob("*.yaml")):
            try:
                t = parse_template(path.read_text(encoding="utf-8"), str(path))
            except (ReportError, UnicodeDecodeError, OSError) as e:
                if problems is None or folder == PACKAGE_TEMPLATES:
                    raise
                problems.append(str(e) if isinstance(e, ReportError) else f"{path}: {e}")
                continue
            out[t.id] = t
    if "generic" not in out:
        out["generic"] = Template(id="generic", title="Free text report")
    return out


def choose_template(templates: dict[str, Template], modalities: str, body_parts: str,
                    description: str = "") -> Template:
    """The best template for a study: modality and body part must match, keywords break ties."""
    mods = {m.upper() for m in modalities.split("\\") if m}
    parts = {b.upper() for b in body_parts.split("\\") if b}
    text = description.lower()
    best, best_score = templates["generic"], 0
    for t in templates.values():
        if not t.modalities or not mods & set(t.modalities):
            continue
        score = 1
        if parts & set(t.body_parts):
            score += 4
        elif t.body_parts and parts:
            continue  # a chest template for a head study is worse than free text
        score += sum(1 for k in t.keywords if k in text)
        if score > best_score:
            best, best_score = t, score
    return best


# -- field values ----------------------------------------------------------------------
def clean_fields(template: Template, values: dict[str, Any]) -> dict[str, Any]:
    """Validate a draft's field values against its template; drop empty values.

    Unknown keys and values outside a choice's options are refused: a report
    must not carry data the template (and so the SR) cannot express.
    """
    if not isinstance(values, dict):
        raise ReportError("fields must be an object of field key to value")
    out: dict[str, Any] = {}
    for key, value in values.items():
        f = template.field(key)
        if f is None:
            raise ReportError(f"unknown field {key!r} for template {template.id}")
        if value is None or value == "" or (value == [] and f.type != "aspects"):
            continue  # an empty ASPECTS list is a score of 10, not "not assessed"
        out[key] = _clean_value(f, value)
    return out


def carry_fields(template: Template, values: dict[str, Any]) -> dict[str, Any]:
    """The values that are valid for ``template`` (same key, acceptable value); others dropped."""
    out = {}
    for key, value in (values or {}).items():
        f = template.field(key)
        if f is None:
            continue
        try:
            out[key] = _clean_value(f, value)
        except ReportError:
            continue
    return out


def _clean_value(f: Field, value: Any) -> Any:
    if f.type == "choice":
        if value not in f.options:
            raise ReportError(f"{f.label}: {value!r} is not one of {', '.join(f.options)}")
        return value
    if f.type == "text":
        return _clean_text(str(value), f.label, 2000)
    if f.type == "boolean":
        if not isinstance(value, bool):
            raise ReportError(f"{f.label}: expected true or false")
        return value
    if f.type == "number":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ReportError(f"{f.label}: expected a number, got {value!r}") from None
        if (f.min is not None and number < f.min) or (f.max is not None and number > f.max):
            raise ReportError(f"{f.label}: {number:g} is outside {f.min}..{f.max}")
        return int(number) if number.is_integer() else number
    codes = [code for code, _ in f.regions]  # aspects: list of affected region codes
    if not isinstance(value, list) or any(v not in codes for v in value):
        raise ReportError(f"{f.label}: expected a list of regions from {', '.join(codes)}")
    return [c for c in codes if c in value]


def _clean_text(text: str, label: str, limit: int = MAX_TEXT) -> str:
    text = text.replace("\r\n", "\n").replace("\x00", "")
    if len(text) > limit:
        raise ReportError(f"{label}: at most {limit} characters")
    return text


def aspects_score(f: Field, affected: list[str]) -> int:
    """ASPECTS: 10 minus one for each region with early ischaemic change."""
    return len(f.regions) - len(affected or [])


def field_lines(template: Template, values: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value as text) for each filled field, in template order."""
    lines = []
    for f in template.fields:
        if f.key not in values:
            continue
        value = values[f.key]
        if f.type == "aspects":
            names = dict(f.regions)
            affected = value or []
            text = f"{aspects_score(f, affected)}/10"
            text += (" (early ischaemic change: " + ", ".join(f"{c} {names[c]}" for c in affected)
                     + ")") if affected else " (no early ischaemic change)"
            lines.append(("ASPECTS", text))
        elif f.type == "boolean":
            lines.append((f.label, "yes" if value else "no"))
        else:
            lines.append((f.label, str(value)))
    return lines


def render_text(template: Template, values: dict[str, Any], findings: str,
                impression: str) -> str:
    """The plain text of a report: what is signed, hashed, printed and sent as SR."""
    parts = [template.title.upper(), ""]
    for label, value in field_lines(template, values):
        parts.append(f"{label}: {value}")
    if findings.strip():
        parts += ["", "FINDINGS", findings.strip()]
    if impression.strip():
        parts += ["", "IMPRESSION", impression.strip()]
    return "\n".join(parts).strip() + "\n"


# -- rows -------------------------------------------------------------------------------
def _row(r: sqlite3.Row | None) -> dict[str, Any] | None:
    if r is None:
        return None
    d = dict(r)
    if "fields" in d:
        d["fields"] = json.loads(d["fields"] or "{}")
    return d


def get_report(conn: sqlite3.Connection, report_id: int) -> dict[str, Any]:
    row = _row(conn.execute("SELECT * FROM reports WHERE id = ?", (report_id,)).fetchone())
    if row is None:
        raise ReportError(f"no report {report_id}", 404)
    return row


def report_for_item(conn: sqlite3.Connection, item_id: int) -> dict[str, Any] | None:
    return _row(conn.execute("SELECT * FROM reports WHERE read_item_id = ? AND kind = 'report'",
                             (item_id,)).fetchone())


def reports_for_study(conn: sqlite3.Connection, study_uid: str) -> list[dict[str, Any]]:
    return [_row(r) for r in conn.execute(
        "SELECT * FROM reports WHERE study_uid = ? ORDER BY id", (study_uid,))]


def addenda(conn: sqlite3.Connection, report_id: int) -> list[dict[str, Any]]:
    return [_row(r) for r in conn.execute(
        "SELECT * FROM reports WHERE parent_id = ? ORDER BY id", (report_id,))]


def versions(conn: sqlite3.Connection, report_id: int) -> list[dict[str, Any]]:
    return [_row(r) for r in conn.execute(
        "SELECT * FROM report_versions WHERE report_id = ? ORDER BY id", (report_id,))]


def get_version(conn: sqlite3.Connection, version_id: int) -> dict[str, Any]:
    row = _row(conn.execute("SELECT * FROM report_versions WHERE id = ?",
                            (version_id,)).fetchone())
    if row is None:
        raise ReportError(f"no signed report version {version_id}", 404)
    return row


def study_row(conn: sqlite3.Connection, study_uid: str) -> dict[str, Any] | None:
    """The study's patient and study identifiers from the DICOM index."""
    r = conn.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
    return dict(r) if r else None


def study_body_parts(conn: sqlite3.Connection, study_uid: str) -> str:
    return "\\".join(r[0] for r in conn.execute(
        "SELECT DISTINCT body_part FROM series WHERE study_uid = ? AND body_part != ''",
        (study_uid,)))


# -- actions ----------------------------------------------------------------------------
def create(conn: sqlite3.Connection, *, study_uid: str, author: str, template_id: str,
           templates: dict[str, Template], read_item_id: int | None = None, source: str = "",
           now: float | None = None) -> int:
    """Start a draft for a study (one report per read item: a second call returns the first)."""
    if template_id not in templates:
        raise ReportError(f"no report template {template_id!r}")
    if study_row(conn, study_uid) is None:
        raise ReportError(f"no study {study_uid} on this appliance", 404)
    t = now if now is not None else time.time()
    with db.transaction(conn):
        if read_item_id is not None:
            existing = report_for_item(conn, read_item_id)
            if existing:
                return existing["id"]
        cur = conn.execute(
            "INSERT INTO reports (study_uid, read_item_id, template_id, author, created_at,"
            " updated_at) VALUES (?,?,?,?,?,?)",
            (study_uid, read_item_id, template_id, author, t, t))
        audit.record(conn, author, "report.create", f"report:{cur.lastrowid}", source=source,
                     detail={"study_uid": study_uid, "template": template_id,
                             "read_item_id": read_item_id}, ts=t)
    return cur.lastrowid


def take_over(conn: sqlite3.Connection, report_id: int, *, actor: str, source: str = "",
              now: float | None = None) -> None:
    """Give an unsigned draft to the reader who now holds the read item's claim.

    A reader who started a draft and released the item (end of shift, lost
    connection) must not block the next one; the earlier author is kept in
    the audit trail.  A signed preliminary stays with its author.
    """
    t = now if now is not None else time.time()
    with db.transaction(conn):
        report = get_report(conn, report_id)
        if report["author"] == actor:
            return
        if report["status"] != "draft":
            raise ReportError(f"this report was signed preliminary by {report['author']}, who "
                              "finalises it", 409)
        conn.execute("UPDATE reports SET author=?, revision=revision+1, updated_at=? WHERE id=?",
                     (actor, t, report_id))
        audit.record(conn, actor, "report.take_over", f"report:{report_id}", source=source,
                     detail={"from": report["author"], "study_uid": report["study_uid"]}, ts=t)


def _editable(report: dict[str, Any], actor: str) -> None:
    if report["status"] == "final":
        raise ReportError("this report is final and locked; add an addendum instead", 409)
    if report["author"] != actor:
        raise ReportError(f"this report is being written by {report['author']}", 403)


def autosave(conn: sqlite3.Connection, report_id: int, *, actor: str, templates:
             dict[str, Template], base_revision: int, fields: dict[str, Any] | None = None,
             findings: str | None = None, impression: str | None = None,
             template_id: str | None = None, source: str = "",
             now: float | None = None) -> int:
    """Save the working text; return the new revision.

    ``base_revision`` is the revision the editor started from: if the report
    moved on since (another tab), the save is refused with 409 so nothing is
    lost silently.
    """
    t = now if now is not None else time.time()
    with db.transaction(conn):
        report = get_report(conn, report_id)
        _editable(report, actor)
        if int(base_revision) != report["revision"]:
            raise ReportError(f"the report changed since you opened it (revision "
                              f"{report['revision']}, yours {base_revision}); reload it", 409)
        tid = template_id or report["template_id"]
        if tid not in templates:
            raise ReportError(f"no report template {tid!r}")
        given = fields if fields is not None else report["fields"]
        if tid != report["template_id"]:  # switching templates keeps the answers that still fit
            given = carry_fields(templates[tid], given)
        values = clean_fields(templates[tid], given)
        new_findings = _clean_text(findings if findings is not None else report["findings"],
                                   "Findings")
        new_impression = _clean_text(impression if impression is not None
                                     else report["impression"], "Impression")
        revision = report["revision"] + 1
        conn.execute(
            "UPDATE reports SET template_id=?, fields=?, findings=?, impression=?, revision=?,"
            " updated_at=? WHERE id=?",
            (tid, json.dumps(values, sort_keys=True), new_findings, new_impression, revision, t,
             report_id))
        audit.record(conn, actor, "report.save", f"report:{report_id}", source=source,
                     detail={"revision": revision, "study_uid": report["study_uid"]}, ts=t)
    return revision


def _display_name(conn: sqlite3.Connection, username: str) -> str:
    return accounts.display_name(conn, username)


def sign(conn: sqlite3.Connection, report_id: int, *, actor: str, level: str,
         templates: dict[str, Template], source: str = "", now: float | None = None,
         on_signed=None) -> int:
    """Sign the report as ``preliminary`` or ``final``; return the signed version's id.

    The exact text, its SHA-256, the reader and the time go into an
    append-only ``report_versions`` row; a final signature also locks the
    report row.  A second signature of the same level is refused.
    ``on_signed(conn, report, version_id)`` runs inside the same transaction
    (the read item's state change, the delivery outbox), so a signature and
    its consequences commit together or not at all.
    """
    if level not in ("preliminary", "final"):
        raise ReportError("sign as 'preliminary' or 'final'")
    t = now if now is not None else time.time()
    with db.transaction(conn):
        report = get_report(conn, report_id)
        if report["status"] == "final":
            raise ReportError("this report is already signed final", 409)
        if level == "preliminary" and report["status"] == "preliminary":
            raise ReportError("this report is already signed preliminary; sign it final", 409)
        if level == "preliminary" and report["kind"] == "addendum":
            raise ReportError("an addendum is signed final only", 400)
        _editable(report, actor)
        template = templates.get(report["template_id"]) or templates["generic"]
        missing = [f.label for f in template.fields if f.required and f.key not in report["fields"]]
        if missing:
            raise ReportError("fill in before signing: " + ", ".join(missing))
        text = render_text(template, report["fields"], report["findings"], report["impression"])
        if not (report["findings"].strip() or report["impression"].strip() or report["fields"]):
            raise ReportError("an empty report cannot be signed")
        if report["kind"] == "addendum":
            text = f"ADDENDUM to report {report['parent_id']}\n\n" + text
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        cur = conn.execute(
            "INSERT INTO report_versions (report_id, level, template_id, fields, findings,"
            " impression, text, sha256, signed_by, signer_name, signed_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (report_id, level, report["template_id"], json.dumps(report["fields"],
             sort_keys=True), report["findings"], report["impression"], text, digest, actor,
             _display_name(conn, actor), t))
        conn.execute("UPDATE reports SET status=?, updated_at=? WHERE id=?", (level, t, report_id))
        audit.record(conn, actor, f"report.sign_{level}", f"report:{report_id}", source=source,
                     detail={"version_id": cur.lastrowid, "sha256": digest,
                             "study_uid": report["study_uid"], "kind": report["kind"]}, ts=t)
        if on_signed is not None:
            on_signed(conn, {**report, "status": level}, cur.lastrowid)
    return cur.lastrowid


def add_addendum(conn: sqlite3.Connection, parent_id: int, *, actor: str, text: str,
                 source: str = "", now: float | None = None) -> int:
    """Start an addendum to a final report: a new linked draft (free text), signed final later."""
    t = now if now is not None else time.time()
    text = _clean_text(text or "", "Addendum")
    with db.transaction(conn):
        parent = get_report(conn, parent_id)
        if parent["kind"] != "report":
            raise ReportError("add the addendum to the original report", 400)
        if parent["status"] != "final":
            raise ReportError("only a final report takes addenda; edit the draft instead", 409)
        cur = conn.execute(
            "INSERT INTO reports (study_uid, read_item_id, kind, parent_id, template_id, findings,"
            " author, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (parent["study_uid"], parent["read_item_id"], "addendum", parent_id, "generic", text,
             actor, t, t))
        audit.record(conn, actor, "report.addendum", f"report:{cur.lastrowid}", source=source,
                     detail={"parent": parent_id, "study_uid": parent["study_uid"]}, ts=t)
    return cur.lastrowid


def final_version(conn: sqlite3.Connection, report_id: int) -> dict[str, Any] | None:
    return _row(conn.execute(
        "SELECT * FROM report_versions WHERE report_id = ? AND level = 'final'",
        (report_id,)).fetchone())


def latest_version(conn: sqlite3.Connection, report_id: int) -> dict[str, Any] | None:
    return _row(conn.execute(
        "SELECT * FROM report_versions WHERE report_id = ? ORDER BY id DESC LIMIT 1",
        (report_id,)).fetchone())


def signed_versions_after(conn: sqlite3.Connection, after_id: int,
                          limit: int | None = None) -> list[dict[str, Any]]:
    """Signed versions (id, report_id, sha256) with an id above ``after_id``, oldest first:
    versions are append-only, so a reader that remembers the last id it took sees each once."""
    sql = "SELECT id, report_id, sha256 FROM report_versions WHERE id > ? ORDER BY id"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return [dict(r) for r in conn.execute(sql, (after_id,))]


def version_record(conn: sqlite3.Connection, version_id: int) -> dict[str, Any]:
    """A signed version and its report as stored (raw rows): what a bundle carries off the box."""
    v = conn.execute("SELECT * FROM report_versions WHERE id=?", (version_id,)).fetchone()
    if v is None:
        raise ReportError(f"no signed report version {version_id}", 404)
    rep = conn.execute("SELECT * FROM reports WHERE id=?", (v["report_id"],)).fetchone()
    return {"report": dict(rep), "version": dict(v)}


_STATUS_RANK = {"draft": 0, "preliminary": 1, "final": 2}


def restore_version_record(conn: sqlite3.Connection, rec: dict[str, Any]) -> int:
    """Insert a :func:`version_record` read back from a bundle (restore); 1 when applied.

    A later signature's bundle carries the newer report row, so the report row
    is updated when the record's status is further along than the one held."""
    with db.transaction(conn):
        for table, row in (("reports", rec["report"]), ("report_versions", rec["version"])):
            cols = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
            keep = {k: v for k, v in row.items() if k in cols}
            conn.execute(f"INSERT OR IGNORE INTO {table} ({', '.join(keep)}) VALUES"
                         f" ({', '.join('?' for _ in keep)})", tuple(keep.values()))
            if table == "reports":
                have = conn.execute("SELECT status FROM reports WHERE id=?",
                                    (row["id"],)).fetchone()
                if _STATUS_RANK.get(row.get("status"), 0) > _STATUS_RANK.get(have["status"], 0):
                    sets = {k: v for k, v in keep.items() if k != "id"}
                    conn.execute(f"UPDATE reports SET {', '.join(f'{k}=?' for k in sets)}"
                                 " WHERE id=?", (*sets.values(), row["id"]))
    return 1
