"""Reconciliation: a temporary identity joined to the real one, two records of one person
merged, a study typed wrong put right, and each undone the same way.

Done with DICOM alone (IHE Patient Information Reconciliation): every stored instance of
the affected studies gets a header-only corrected version (:mod:`dicom_node.correction`:
pixel data untouched, old values in the Original Attributes Sequence, the old ID in Other
Patient IDs, the previous file kept as a version), and in the same pass the index (so
C-FIND and QIDO), the orders (so the worklist) and the registration are updated.  A signed
report is never edited: each final report of an affected study gets a signed correction
addendum naming the change, delivered like any addendum (its SR carries the corrected
identity and names the original as its predecessor), and the original is marked superseded
by it (:mod:`appliance.reports.corrections`; an unlink's addendum supersedes the link's).
In the transaction that records the link, those addenda and marks are made, the corrected
objects are queued again wherever they went (forwarding's outbox for images, report
delivery for the SR/PDF documents, which carry the study's identity as the index holds
it), and every copy a destination held under the old identity is recorded as
superseded: :mod:`appliance.patients.superseded` removes it there once the corrected copy is
proved delivered, never before.

Who, what and why are audited.  Refused with a clear error and nothing changed: merging a
record into itself, a loop (A→B when B is already merged into A), linking into a record
that was itself merged away.  A replay (the same link again) changes nothing.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from appliance.core import audit, config, db
from appliance.forwarding import outbox as forward_outbox
from appliance.patients import registry, superseded
from appliance.patients.registry import RegistrationError
from appliance.reports import corrections
from dicom_node import correction
from dicom_node import index as dicom_index
from dicom_node.study_store import StudyStore

SYSTEM = "APPLIANCE-RECONCILE"


class ReconciliationError(RegistrationError):
    """A link, merge or unlink that would be wrong; nothing was changed."""


def _identity(p: dict[str, Any]) -> dict[str, str]:
    """The patient attributes an instance carries for this registration."""
    return {"PatientID": p["patient_id"], "PatientName": p["name"],
            "PatientBirthDate": p["birth_date"], "PatientSex": p["sex"]}


def _store(cfg: config.Config) -> StudyStore:
    return StudyStore(cfg.studies_dir, cfg.db_path, connect=db.connect)


def _check(conn: sqlite3.Connection, source: dict[str, Any], target: dict[str, Any],
           kind: str) -> dict[str, Any] | None:
    """The live link this request replays (None when new); raises when it is wrong."""
    if source["id"] == target["id"]:
        raise ReconciliationError("a record cannot be merged into itself")
    if kind == "link" and not source["temporary"]:
        raise ReconciliationError(f"{source['patient_id']} is not a temporary identity: "
                                  "use merge for two records of one person")
    live = conn.execute("SELECT * FROM patient_links WHERE from_ref = ? AND undone_at IS NULL",
                        (source["id"],)).fetchone()
    if live is not None:
        if live["to_ref"] == target["id"]:
            return dict(live)  # the same link again: nothing to do
        raise ReconciliationError(f"{source['patient_id']} is already linked to record "
                                  f"#{live['to_ref']}: unlink it first")
    ref, seen = target["merged_into"], {target["id"]}
    while ref is not None and ref not in seen:
        if ref == source["id"]:
            raise ReconciliationError(f"{target['patient_id']} is already merged into "
                                      f"{source['patient_id']}: that would be a loop")
        seen.add(ref)
        ref = registry.get(conn, ref)["merged_into"]
    if target["merged_into"] is not None:
        raise ReconciliationError(f"{target['patient_id']} was merged into record "
                                  f"#{target['merged_into']}: link to that one")
    return None


def link(cfg: config.Config, conn: sqlite3.Connection, source_id: str, target_id: str, *,
         actor: str, reason: str, kind: str = "link", source: str = "") -> dict[str, Any]:
    """Join ``source_id``'s studies, orders and reports to ``target_id`` (link or merge)."""
    if not (reason or "").strip():
        raise ReconciliationError("give a reason (it goes into the audit trail)")
    src, dst = registry.find(conn, source_id), registry.find(conn, target_id)
    replay = _check(conn, src, dst, kind)
    if replay is not None:
        return {"link": replay["id"], "replayed": True, "instances": 0, "studies": []}
    key = f"link:{src['id']}"
    plan = _begin(conn, key, {"kind": kind, "to": dst["id"]}, lambda: _plan(
        conn, correction.studies_of_patient(conn, src["patient_id"])),
        f"{kind} of {src['patient_id']} to {dst['patient_id']}")
    studies, old_ids = plan["studies"], plan["old_ids"]
    _correct(cfg, studies, _identity(dst), f"{kind} {src['patient_id']}")
    changed = _instances(conn, studies)
    orders = [o["id"] for o in registry.orders_of(conn, src["id"])]
    now = time.time()
    with db.transaction(conn):
        _done(conn, key)
        conn.execute("UPDATE orders SET patient_ref = ?, updated_at = ? WHERE patient_ref = ?",
                     (dst["id"], now, src["id"]))
        conn.execute("UPDATE patients SET merged_into = ? WHERE id = ?", (dst["id"], src["id"]))
        detail = {"studies": studies, "orders": orders, "instances": len(changed),
                  "from": _identity(src), "to": _identity(dst)}
        cur = conn.execute(
            "INSERT INTO patient_links (kind, from_ref, to_ref, actor, reason, detail, at)"
            " VALUES (?,?,?,?,?,?,?)", (kind, src["id"], dst["id"], actor, reason.strip(),
                                        json.dumps(detail), now))
        _recheck(conn, studies)
        audit.record(conn, actor, f"patient.{kind}", src["patient_id"], source=source,
                     detail={"link": cur.lastrowid, "to": dst["patient_id"], "reason": reason,
                             "studies": studies, "instances": len(changed)})
        _resend_corrected(conn, changed, studies, old_ids, cur.lastrowid, now)
        reissued = corrections.issue(conn, cfg, studies, _correction(
            cur.lastrowid, kind, dst, f"{src['patient_id']} ({src['name']}) is "
                                      f"{dst['patient_id']} ({dst['name']})"),
            actor=actor, source=source, now=now)
    return {"link": cur.lastrowid, "replayed": False, "instances": len(changed),
            "studies": studies, "reports_reissued": reissued}


def unlink(cfg: config.Config, conn: sqlite3.Connection, source_id: str, *, actor: str,
           reason: str, source: str = "") -> dict[str, Any]:
    """Undo the live link of ``source_id`` the same way: its studies get its identity back."""
    if not (reason or "").strip():
        raise ReconciliationError("give a reason (it goes into the audit trail)")
    src = registry.find(conn, source_id)
    live = conn.execute("SELECT * FROM patient_links WHERE from_ref = ? AND undone_at IS NULL",
                        (src["id"],)).fetchone()
    if live is None:
        raise ReconciliationError(f"{src['patient_id']} is not linked to anyone")
    detail = json.loads(live["detail"])
    key = f"unlink:{src['id']}"
    plan = _begin(conn, key, {"link": live["id"]}, lambda: _plan(conn, detail["studies"]),
                  f"unlink of {src['patient_id']}")
    old_ids = plan["old_ids"]
    _correct(cfg, detail["studies"], detail["from"], f"unlink {src['patient_id']}")
    changed = _instances(conn, detail["studies"])
    now = time.time()
    with db.transaction(conn):
        _done(conn, key)
        if detail["orders"]:
            marks = ",".join("?" * len(detail["orders"]))
            conn.execute(f"UPDATE orders SET patient_ref = ?, updated_at = ? WHERE id IN ({marks})",
                         (src["id"], now, *detail["orders"]))
        conn.execute("UPDATE patients SET merged_into = NULL WHERE id = ?", (src["id"],))
        conn.execute("UPDATE patient_links SET undone_at = ?, undone_by = ? WHERE id = ?",
                     (now, actor, live["id"]))
        _recheck(conn, detail["studies"])
        audit.record(conn, actor, "patient.unlink", src["patient_id"], source=source,
                     detail={"link": live["id"], "reason": reason, "instances": len(changed)})
        _resend_corrected(conn, changed, detail["studies"], old_ids, live["id"], now)
        reissued = corrections.issue(conn, cfg, detail["studies"], _correction(
            live["id"], "unlink", src, f"{detail['to']['PatientID']} is not"
                                       f" {src['patient_id']}: the link was undone;"
                                       f" {src['patient_id']} ({src['name']}) is restored"),
            actor=actor, source=source, now=now)
    return {"link": live["id"], "instances": len(changed), "reports_reissued": reissued}


def fix_study(cfg: config.Config, conn: sqlite3.Connection, study_uid: str, patient_id: str, *,
              actor: str, reason: str, source: str = "") -> dict[str, Any]:
    """Put one study right (a name typed wrong on the console): it takes the registration's
    identity.  Audited; undone by fixing it again."""
    if not (reason or "").strip():
        raise ReconciliationError("give a reason (it goes into the audit trail)")
    dst = registry.find(conn, patient_id)
    if dst["merged_into"] is not None:
        raise ReconciliationError(f"{dst['patient_id']} was merged: use the record it was "
                                  "merged into")
    key = f"study:{study_uid}"
    resumed = _pending(conn, key) is not None
    plan = _begin(conn, key, {"to": dst["id"]}, lambda: _plan(conn, [study_uid]),
                  f"correction of study {study_uid} to {dst['patient_id']}")
    old_ids = plan["old_ids"]
    if not _correct(cfg, [study_uid], _identity(dst), "study correction") and not resumed:
        _done(conn, key)
        return {"instances": 0, "replayed": True}
    changed = _instances(conn, [study_uid])
    now = time.time()
    with db.transaction(conn):
        _done(conn, key)
        cur = conn.execute("INSERT INTO patient_links (kind, study_uid, to_ref, actor, reason,"
                           " detail, at) VALUES ('study',?,?,?,?,?,?)",
                           (study_uid, dst["id"], actor, reason.strip(),
                            json.dumps({"instances": len(changed)}), now))
        _recheck(conn, [study_uid])
        audit.record(conn, actor, "patient.fix_study", study_uid, source=source,
                     detail={"to": dst["patient_id"], "reason": reason,
                             "instances": len(changed)})
        _resend_corrected(conn, changed, [study_uid], old_ids, cur.lastrowid, now)
        reissued = corrections.issue(conn, cfg, [study_uid], _correction(
            cur.lastrowid, "study", dst, f"the study belongs to {dst['patient_id']}"
                                         f" ({dst['name']})"), actor=actor, source=source,
            now=now)
    return {"instances": len(changed), "replayed": False, "reports_reissued": reissued}


# -- write-ahead: the files are corrected before the link's transaction ---------------------
# Rewriting every instance cannot happen inside one SQLite transaction, so the plan (which
# studies, under which Patient IDs they were) is committed first and removed by the
# transaction that records the link.  A process killed in between leaves the plan: the same
# command run again finishes the same correction (the files already corrected are skipped,
# every instance of the studies is sent again and its old copy recorded), where it would
# otherwise find no study left under the temporary ID and record an empty link.
PENDING = "patients.reconcile_pending."


def _pending(conn: sqlite3.Connection, key: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (PENDING + key,)).fetchone()
    return json.loads(row[0]) if row else None


def _plan(conn: sqlite3.Connection, studies: list[str]) -> dict[str, Any]:
    return {"studies": studies, "old_ids": dicom_index.patient_ids(conn, studies)}


def _begin(conn: sqlite3.Connection, key: str, what: dict[str, Any], make, name: str
           ) -> dict[str, Any]:
    """The interrupted plan for ``key`` if there is one (it must be the same operation),
    else a new one, committed before any file is touched."""
    with db.transaction(conn):
        found = _pending(conn, key)
        if found is not None:
            if {k: found.get(k) for k in what} != what:
                raise ReconciliationError(
                    f"the {found['name']} was interrupted and is not finished: run that"
                    " command again first (nothing was changed)")
            return found
        plan = {**what, **make(), "name": name}
        conn.execute("INSERT INTO settings (key, value) VALUES (?, ?)",
                     (PENDING + key, json.dumps(plan)))
        return plan


def _done(conn: sqlite3.Connection, key: str) -> None:
    conn.execute("DELETE FROM settings WHERE key = ?", (PENDING + key,))


def _instances(conn: sqlite3.Connection, studies: list[str]) -> list[str]:
    """Every instance of the studies (each has its corrected version now, whether this run or
    an interrupted one wrote it): all are sent again."""
    return [r["sop_uid"] for uid in studies
            for r in dicom_index.instances_to_send(conn, study_uid=uid)]


def _correct(cfg: config.Config, studies: list[str], identity: dict[str, str],
             why: str) -> list[str]:
    store = _store(cfg)
    try:
        changed: list[str] = []
        for uid in studies:
            changed += correction.correct_study(store, uid, identity, why, SYSTEM)
        return changed
    finally:
        store.close()


def _recheck(conn: sqlite3.Connection, studies: list[str]) -> None:
    """Orders meet studies again at the next sweep: the flag follows the corrected header."""
    for uid in studies:
        conn.execute("UPDATE order_studies SET checked_at = 0 WHERE study_uid = ?", (uid,))


def _correction(link_id: int, action: str, now_is: dict[str, Any],
                statement: str) -> corrections.Correction:
    """What the reports are told: which link, what was done, the registration the studies
    belong to now.  Issued inside the link's transaction (a link is never recorded without
    its correction addenda and marks; a replay returns before, so nothing is marked twice)."""
    return corrections.Correction(link_id=link_id, action=action,
                                  patient_id=now_is["patient_id"], patient_name=now_is["name"],
                                  statement=statement)


def _resend_corrected(conn: sqlite3.Connection, sop_uids: list[str], studies: list[str],
                      old_ids: dict[str, str], link_id: int, now: float) -> int:
    """Send corrected objects again wherever they went (same SOP Instance UID, corrected
    header): images through forwarding's outbox, the studies' delivered report documents
    through report delivery; and record each copy held under the old identity as superseded.
    In the caller's transaction, so the record and the re-sends stand or fall together (the
    old copy is removed only once its row sees the corrected copy delivered).  Returns how
    many outbox rows were queued again."""
    from appliance.reports import delivery

    with db.transaction(conn):
        copies = superseded.held_copies(conn, sop_uids, studies)
        superseded.record(conn, copies, old_ids, link_id, now)
        documents = delivery.sent_documents(conn, studies)
        forward_outbox.commit_documents_again(conn, [d["sop_uid"] for d in documents])
        delivery.make_due(conn, [d["id"] for d in documents], now, again=True)
        return forward_outbox.resend_instances(conn, sop_uids, now)
