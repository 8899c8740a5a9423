"""Identity corrections of signed reports: the addendum that corrects, and the mark it leaves
on each report it supersedes.

A signed report is never edited.  When a reconciliation (a link, a merge, its unlink, a study
put right) changes whose study a final report is about, the report gets a signed addendum
naming the correction, delivered like any addendum, and the report is **marked superseded**
by it: a ``report_supersessions`` row (who, when, which link, which addendum, the identity
the study carries since).  The final report row itself cannot carry the mark: a trigger
locks it (``reports_final_locked``), which is the point of signing.

Corrections form a chain per original report, and the newest wins: each new correction
marks the original again and also the correction addendum before it (after a link and its
unlink, the original and the link's addendum are both superseded by the unlink's), so a
reader opening any of them is sent to the one that is true now.  Clinical addenda are not
part of the chain: their findings are not what a correction changes.

Everything here runs in the caller's transaction (the link's), so a link never stands
without its corrections and marks, nor the other way round.  Marks are append-only
(triggers) and each is audited with the mark.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from appliance.core import audit, db
from appliance.reports import delivery
from appliance.reports import model as reports

ACTIONS = ("link", "merge", "unlink", "study")
ACTION_WORDS = {"link": "link", "merge": "merge", "unlink": "undoing of link",
                "study": "study correction"}


@dataclass(frozen=True)
class Correction:
    """One reconciliation as the reports see it: what was done, to which ``patient_links``
    row, the identity the studies carry since, and the sentence the addendum states."""

    link_id: int
    action: str
    patient_id: str
    patient_name: str
    statement: str

    def check(self) -> None:
        """Refuse a correction that could not be shown truthfully later (nothing written)."""
        if self.action not in ACTIONS:
            raise reports.ReportError(f"unknown correction {self.action!r}: one of "
                                      f"{', '.join(ACTIONS)}")
        if not self.patient_id.strip() or not self.statement.strip():
            raise reports.ReportError("a correction names the patient and what changed")


def issue(conn: sqlite3.Connection, cfg: Any, studies: list[str], correction: Correction, *,
          actor: str, source: str = "", now: float | None = None) -> list[int]:
    """A signed correction addendum for each final report of ``studies``, and the marks on
    what it supersedes; returns the addenda's ids.  In the caller's transaction when one is
    open (the link's), else in its own."""
    correction.check()
    t = now if now is not None else time.time()
    templates = reports.load_templates(cfg.data_dir / "report_templates", [])
    made = []
    with db.transaction(conn):
        for uid in studies:
            for report in reports.reports_for_study(conn, uid):
                if report["kind"] == "report" and report["status"] == "final":
                    made.append(_correct(conn, cfg, report, correction, actor=actor,
                                         templates=templates, source=source, now=t))
    return made


def _correct(conn: sqlite3.Connection, cfg: Any, report: dict[str, Any],
             correction: Correction, *, actor: str, templates: dict[str, reports.Template],
             source: str, now: float) -> int:
    """Sign one correction addendum; mark the original and the correction it replaces."""
    before = _newest(conn, report["id"])
    text = (f"Identity correction: {correction.statement}. The findings and impression of the"
            " report are unchanged.")
    add = reports.add_addendum(conn, report["id"], actor=actor, text=text, source=source,
                               now=now)
    delivery.sign(conn, cfg, add, actor=actor, level="final", templates=templates,
                  source=source, now=now)
    _mark(conn, report["id"], add, correction, actor=actor, source=source, now=now)
    if before is not None:
        _mark(conn, before["addendum_id"], add, correction, actor=actor, source=source, now=now)
    return add


def _mark(conn: sqlite3.Connection, report_id: int, addendum_id: int, correction: Correction,
          *, actor: str, source: str, now: float) -> None:
    """One mark, audited with it; a mark already there (the same pair) is not made twice."""
    done = conn.execute(
        "INSERT OR IGNORE INTO report_supersessions (report_id, addendum_id, link_id, action,"
        " patient_id, patient_name, actor, at) VALUES (?,?,?,?,?,?,?,?)",
        (report_id, addendum_id, correction.link_id, correction.action, correction.patient_id,
         correction.patient_name, actor, now)).rowcount
    if done:
        audit.record(conn, actor, "report.superseded", f"report:{report_id}", source=source,
                     ts=now, detail={"by_addendum": addendum_id, "link": correction.link_id,
                                     "action": correction.action})


# -- what readers see -------------------------------------------------------------------------
def _newest(conn: sqlite3.Connection, report_id: int) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM report_supersessions WHERE report_id = ?"
                       " ORDER BY id DESC LIMIT 1", (report_id,)).fetchone()
    return dict(row) if row else None


def _root(report: dict[str, Any]) -> int:
    """The original report of a chain (a correction addendum's parent)."""
    return report["parent_id"] if report["kind"] == "addendum" and report["parent_id"] \
        else report["id"]


def superseded_by(conn: sqlite3.Connection, report: dict[str, Any]) -> dict[str, Any] | None:
    """The correction that is true now for a superseded report, or None when it is current.

    The newest correction wins: a link's addendum superseded by the unlink's names the
    unlink's (which marked the original too), never the step in between."""
    own = _newest(conn, report["id"])
    if own is None:
        return None
    return public(_newest(conn, _root(report)) or own)


def chain(conn: sqlite3.Connection, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every identity correction of the report's original, oldest first, each naming the
    correction that replaced it (``replaced_by``: an addendum id, None for the current one).
    What the report page lists under the banner."""
    rows = [public(dict(r)) for r in conn.execute(
        "SELECT * FROM report_supersessions WHERE report_id = ? ORDER BY id", (_root(report),))]
    for i, r in enumerate(rows):
        r["replaced_by"] = rows[i + 1]["addendum_id"] if i + 1 < len(rows) else None
    return rows


def for_listing(conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> dict[int, dict]:
    """``superseded_by`` for many reports (``id``, ``kind``, ``parent_id``) in one query."""
    ids = sorted({r["id"] for r in rows} | {_root(r) for r in rows})
    newest: dict[int, dict[str, Any]] = {}
    for chunk in (ids[i:i + 500] for i in range(0, len(ids), 500)):
        for r in conn.execute(f"SELECT * FROM report_supersessions WHERE report_id IN"
                              f" ({','.join('?' * len(chunk))}) ORDER BY id", chunk):
            newest[r["report_id"]] = dict(r)
    return {r["id"]: public(newest.get(_root(r)) or newest[r["id"]])
            for r in rows if r["id"] in newest}


def for_report_ids(conn: sqlite3.Connection, ids: list[int]) -> dict[int, dict]:
    """:func:`for_listing` by report id (the delivery outbox names reports by id only)."""
    uniq = sorted(set(ids))
    rows: list[dict[str, Any]] = []
    for chunk in (uniq[i:i + 500] for i in range(0, len(uniq), 500)):
        rows += [dict(r) for r in conn.execute(
            f"SELECT id, kind, parent_id FROM reports WHERE id IN ({','.join('?' * len(chunk))})",
            chunk)]
    return for_listing(conn, rows)


def of_studies(conn: sqlite3.Connection, study_uids: list[str]) -> list[dict[str, Any]]:
    """The signed reports and addenda of these studies, oldest first, each with the
    correction that supersedes it (``superseded_by``, None when current): where a patient's
    record lists its reports."""
    rows = [{k: r[k] for k in ("id", "kind", "parent_id", "status", "study_uid", "author",
                               "updated_at")}
            for uid in dict.fromkeys(study_uids) for r in reports.reports_for_study(conn, uid)
            if r["status"] != "draft"]
    marks = for_listing(conn, rows)
    return [{**r, "superseded_by": marks.get(r["id"])} for r in rows]


def public(mark: dict[str, Any]) -> dict[str, Any]:
    """A mark as the page, the JSON API and the CLI show it."""
    return {"addendum_id": mark["addendum_id"], "url": f"/reports/{mark['addendum_id']}",
            "link_id": mark["link_id"], "action": mark["action"],
            "action_text": ACTION_WORDS[mark["action"]], "by": mark["actor"], "at": mark["at"],
            "patient_id": mark["patient_id"], "patient_name": mark["patient_name"]}


def sentence(mark: dict[str, Any]) -> str:
    """The report page's banner in words, for the CLI (local time, as the page shows it)."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(mark["at"]))
    name = (mark["patient_name"] or "").replace("^", " ").strip()
    return (f"superseded by the identity correction of {when} (addendum {mark['addendum_id']},"
            f" {mark['action_text']} #{mark['link_id']}): the patient is now "
            f"{mark['patient_id']}" + (f" ({name})" if name else ""))
