"""The read queue sweep: study completion, read items, late instances, claims, SLA ladder.

``appliance worker`` runs :func:`sweep` every ``worker.sweep_interval_s``.
Nothing here relies on a huey task surviving (huey's SQLite storage loses a
task whose consumer is killed): the durable state is in our tables and each
pass does whatever is due, in small transactions, so a ``kill -9`` at any
line leaves either the whole of a change or none of it, and the next pass
finishes the job.

- *Arriving*: triggers on the index put every touched study in
  ``pending_completions`` (in the study store's own transaction). When the
  workflow routes a study still arriving as STAT (or urgent), its read item is
  made on the next pass (``arriving``: the worklist says images are arriving,
  its image count rises): the due time is first instance + SLA, and every
  escalation step is timed then. ``read_items.study_uid`` is UNIQUE, so a
  second item is impossible even if two sweeps race.
- *Completion*: a study with no instance for ``worker.quiet_period_s`` is
  complete (:func:`study_complete`, the one place for what needs the whole
  study): a routine study gets its read item then; a listed one is re-decided
  on all its series and re-routed if its rule changed.
- *Late instances* (after completion, or after a report on an arriving study)
  attach to the existing item and flag it.
- *Claims* whose lease lapsed go back to the queue (history + audit).
- *Escalations*: each step whose time has come fires once: ``fired_at`` is
  set in the same transaction as its notifications and effects.
- *Workflows* are re-read when a file's mtime or size changes; an invalid
  edit is logged and audited, and the last good version (kept in
  ``workflow_versions``, so it survives a restart) stays in force.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.accounts import users as accounts
from appliance.core import audit, config, db, notifications
from appliance.forwarding import outbox as forward_outbox
from appliance.reading import worklist
from workflows import engine, facts
from workflows.schema import Shift, Workflow, WorkflowError, on_duty, parse

log = logging.getLogger("appliance.read_queue")

BATCH = 100  # rows per transaction: short write locks, bounded loss of work on a kill
SYSTEM = worklist.SYSTEM_ACTOR
Clock = Callable[[], float]


# -- workflow files ------------------------------------------------------------------------------
@dataclass
class _Loaded:
    stamp: tuple[int, int]
    workflow: Workflow | None
    problems: list[str] = field(default_factory=list)


class WorkflowSet:
    """The workflow files of one directory, reloaded on change with last-good semantics."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.files: dict[str, _Loaded] = {}

    def paths(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir()
                      if p.suffix in (".yaml", ".yml") and p.is_file())

    def refresh(self, conn: sqlite3.Connection, now: float) -> list[Workflow]:
        """Check every file's mtime/size; (re)load what changed; return what is in force."""
        seen = set()
        for path in self.paths():
            seen.add(path.name)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            current = self.files.get(path.name)
            if current is None or current.stamp != stamp:
                self.files[path.name] = self._load(conn, path, stamp, current, now)
        for gone in set(self.files) - seen:
            log.warning("workflow file removed, its rules no longer apply",
                        extra={"workflow_file": gone})
            del self.files[gone]
            conn.execute("DELETE FROM workflow_files WHERE filename = ?", (gone,))
        return self.active()

    def active(self) -> list[Workflow]:
        return [f.workflow for f in self.files.values() if f.workflow is not None]

    def _load(self, conn: sqlite3.Connection, path: Path, stamp: tuple[int, int],
              current: _Loaded | None, now: float) -> _Loaded:
        try:
            text = path.read_text(encoding="utf-8")
            wf = parse(text, path, accounts.ROLES)
        except (WorkflowError, UnicodeDecodeError, OSError) as e:
            problems = e.problems if isinstance(e, WorkflowError) else [f"{path}: {e}"]
            keep = current.workflow if current else _last_good(conn, path)
            _record_rejected(conn, path, problems, keep, now)
            return _Loaded(stamp, keep, problems)
        _record_loaded(conn, path, wf, now)
        return _Loaded(stamp, wf)


def _last_good(conn: sqlite3.Connection, path: Path) -> Workflow | None:
    """The newest good version of a file stored by any earlier load (survives restarts)."""
    row = conn.execute(
        "SELECT v.content FROM workflow_versions v LEFT JOIN workflow_files f"
        " ON f.filename = v.filename AND f.active_sha = v.sha256"
        " WHERE v.filename = ? ORDER BY (f.filename IS NOT NULL) DESC, v.loaded_at DESC, v.id DESC"
        " LIMIT 1", (path.name,),
    ).fetchone()
    if row is None:
        return None
    try:
        return parse(row["content"], path, accounts.ROLES)
    except WorkflowError:
        return None


def _record_loaded(conn: sqlite3.Connection, path: Path, wf: Workflow, now: float) -> None:
    with db.transaction(conn):
        new = conn.execute(
            "INSERT INTO workflow_versions (filename, sha256, content, loaded_at) VALUES (?,?,?,?)"
            " ON CONFLICT(filename, sha256) DO NOTHING", (path.name, wf.sha256, wf.text, now),
        ).rowcount
        prev = conn.execute("SELECT active_sha FROM workflow_files WHERE filename = ?",
                            (path.name,)).fetchone()
        changed = prev is None or prev["active_sha"] != wf.sha256
        conn.execute(
            "INSERT INTO workflow_files (filename, active_sha, active_since, last_error,"
            " last_error_at, checked_at) VALUES (?,?,?,NULL,NULL,?) ON CONFLICT(filename) DO"
            " UPDATE SET active_sha = excluded.active_sha, active_since = CASE WHEN"
            " workflow_files.active_sha = excluded.active_sha THEN workflow_files.active_since"
            " ELSE excluded.active_since END, last_error = NULL, last_error_at = NULL,"
            " checked_at = excluded.checked_at",
            (path.name, wf.sha256, now, now),
        )
        if changed:
            audit.record(conn, SYSTEM, "workflow.loaded", path.name, source="worker",
                         detail={"workflow": wf.name, "sha256": wf.sha256, "rules": len(wf.rules),
                                 "new_version": bool(new)}, ts=now)
    if changed:
        log.info("workflow loaded", extra={"workflow_file": path.name, "workflow": wf.name,
                                           "rules": len(wf.rules), "sha256": wf.sha256[:12]})


def _record_rejected(conn: sqlite3.Connection, path: Path, problems: list[str],
                     keep: Workflow | None, now: float) -> None:
    text = "\n".join(problems)
    kept = keep.sha256 if keep else None
    with db.transaction(conn):
        conn.execute(
            "INSERT INTO workflow_files (filename, active_sha, active_since, last_error,"
            " last_error_at, checked_at) VALUES (?,?,?,?,?,?) ON CONFLICT(filename) DO UPDATE"
            " SET active_sha = excluded.active_sha, last_error = excluded.last_error,"
            " last_error_at = excluded.last_error_at, checked_at = excluded.checked_at",
            (path.name, kept, now if kept else None, text, now, now),
        )
        audit.record(conn, SYSTEM, "workflow.rejected", path.name, source="worker",
                     outcome="error", detail={"problems": problems, "kept_sha256": kept}, ts=now)
    log.error("workflow edit rejected, %s: %s",
              "last good version stays in force" if keep else "no good version to keep", text,
              extra={"workflow_file": path.name})


_SETS: dict[Path, WorkflowSet] = {}
_LOCK = threading.Lock()


def workflow_set(directory: Path) -> WorkflowSet:
    """One set per directory per process, so unchanged files are not re-parsed each pass."""
    key = Path(directory).resolve()
    if key not in _SETS:
        _SETS[key] = WorkflowSet(key)
    return _SETS[key]


# -- completion ----------------------------------------------------------------------------------
def study_facts(conn: sqlite3.Connection, study_uid: str) -> engine.StudyFacts | None:
    """What the workflow sees of a stored study, from the index tables."""
    study = conn.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
    if study is None:
        return None
    series = conn.execute("SELECT modality, body_part, series_description FROM series"
                          " WHERE study_uid = ? ORDER BY series_number, series_uid",
                          (study_uid,)).fetchall()
    return facts.from_index(dict(study), [dict(s) for s in series])


# Priorities listed while their study still arrives. Routine studies wait for completion:
# their SLA (an hour) gains nothing from 30 s, a reader claiming half a study wastes a read,
# and a later series may still route them elsewhere (completion re-decides either way).
EARLY_PRIORITIES = ("stat", "urgent")
# Studies arriving at once that one pass looks at: every one, in practice (a routine study
# already decided costs a dict lookup), so a STAT study is never starved behind a page of them.
ARRIVING_LIMIT = 5000
_ROUTINE_SEEN: dict[str, tuple[int, tuple[str, ...]]] = {}  # study → (series, workflow shas)


def complete_studies(conn: sqlite3.Connection, workflows: list[Workflow], now: float,
                     quiet_s: float) -> dict[str, int]:
    """List STAT studies while they arrive; complete quiet studies; attach late instances."""
    created, late = open_arriving(conn, workflows, now, quiet_s)
    counts = {"created": created, "completed": 0, "late": late}
    while True:
        with db.transaction(conn):
            rows = conn.execute(
                "SELECT p.study_uid, s.study_uid AS present, s.last_received, s.num_instances,"
                " r.id AS item_id, r.instances_seen, r.claimed_by, r.state, r.arriving"
                " FROM pending_completions p LEFT JOIN studies s USING (study_uid)"
                " LEFT JOIN read_items r ON r.study_uid = p.study_uid"
                " WHERE s.study_uid IS NULL OR s.last_received <= ? OR r.arriving = 0 LIMIT ?",
                (now - quiet_s, BATCH),
            ).fetchall()
            for row in rows:
                if row["present"] is None:
                    pass  # the study was removed from the index: nothing to read
                elif row["item_id"] is not None and not row["arriving"]:
                    counts["late"] += _attach_late(conn, row, now)
                else:
                    item_id = row["item_id"]
                    if item_id is None:
                        item_id = _create_item(conn, row["study_uid"], workflows, now)
                        counts["created"] += 1
                    counts["completed"] += study_complete(conn, item_id, workflows, now)
                conn.execute("DELETE FROM pending_completions WHERE study_uid = ?",
                             (row["study_uid"],))
        if len(rows) < BATCH:
            return counts


def open_arriving(conn: sqlite3.Connection, workflows: list[Workflow], now: float,
                  quiet_s: float) -> tuple[int, int]:
    """Studies still arriving: a read item as soon as the rule says STAT (or urgent), and the
    image count of items already listed kept rising. Returns (items created, items flagged
    late: images after a report on what had arrived).

    The study stays in ``pending_completions`` until it is quiet: then
    :func:`study_complete` runs. A routine decision is remembered per series count and
    workflow version, so a long routine study is not re-decided on every pass.
    """
    rows = conn.execute(
        "SELECT p.study_uid, s.num_instances, s.num_series, r.id AS item_id, r.instances_seen,"
        " r.claimed_by, r.state, r.read_at FROM pending_completions p"
        " JOIN studies s USING (study_uid) LEFT JOIN read_items r ON r.study_uid = p.study_uid"
        " WHERE s.last_received > ? AND (r.id IS NULL OR (r.arriving = 1"
        " AND r.instances_seen != s.num_instances)) LIMIT ?",
        (now - quiet_s, ARRIVING_LIMIT),
    ).fetchall()
    shas = tuple(w.sha256 for w in workflows)
    created = late = 0
    for row in rows:
        if row["item_id"] is None and \
                _ROUTINE_SEEN.get(row["study_uid"]) == (row["num_series"], shas):
            continue  # decided routine on these series already: it waits for completion
        with db.transaction(conn):
            if row["item_id"] is not None:
                late += _arriving_count(conn, row, now)
                continue
            decision = engine.decide(workflows, study_facts(conn, row["study_uid"]))
            if decision.priority not in EARLY_PRIORITIES:
                if len(_ROUTINE_SEEN) > 10_000:
                    _ROUTINE_SEEN.clear()
                _ROUTINE_SEEN[row["study_uid"]] = (row["num_series"], shas)
                continue
            if conn.execute("SELECT 1 FROM read_items WHERE study_uid = ?",
                            (row["study_uid"],)).fetchone() is None:  # no other pass made it
                _create_item(conn, row["study_uid"], workflows, now, decision)
                created += 1
    return created, late


def _arriving_count(conn: sqlite3.Connection, row: sqlite3.Row, now: float) -> int:
    """More images of a listed study still arriving: the count rises; once a report was
    signed on what had arrived they are late images (flagged, the reader told)."""
    if row["read_at"] is not None:
        return _attach_late(conn, row, now)
    modalities = conn.execute("SELECT modalities FROM studies WHERE study_uid = ?",
                              (row["study_uid"],)).fetchone()[0]
    conn.execute("UPDATE read_items SET instances_seen = ?, modalities = ?, updated_at = ?"
                 " WHERE id = ? AND arriving = 1",
                 (row["num_instances"], _modalities(conn, row["study_uid"], modalities), now,
                  row["item_id"]))
    return 0


def _modalities(conn: sqlite3.Connection, study_uid: str, fallback: str | None) -> str:
    f = study_facts(conn, study_uid)
    return "\\".join(f.modalities) if f else (fallback or "")


def study_complete(conn: sqlite3.Connection, item_id: int, workflows: list[Workflow],
                   now: float) -> int:
    """THE "study complete" moment: quiet for ``worker.quiet_period_s``. Runs once per item.

    Called in the transaction that takes the study off ``pending_completions``. The rule
    is decided again on the whole study (a later series may route it elsewhere: the item
    is re-routed, never duplicated); from here on new images are late images. Whatever
    needs the complete study (forwarding it, say) belongs in this function. Returns 1
    when it completed the item, 0 when it was complete already.
    """
    item = conn.execute("SELECT * FROM read_items WHERE id = ?", (item_id,)).fetchone()
    if item is None or not item["arriving"]:
        return 0
    study = conn.execute("SELECT num_instances FROM studies WHERE study_uid = ?",
                         (item["study_uid"],)).fetchone()
    decision = engine.decide(workflows, study_facts(conn, item["study_uid"]))
    if _route(item) != _route_of(decision):
        _reroute(conn, item, decision, now)
    conn.execute("UPDATE read_items SET arriving = 0, completed_at = ?, instances_seen = ?,"
                 " modalities = ?, updated_at = ? WHERE id = ? AND arriving = 1",
                 (now, study["num_instances"], _modalities(conn, item["study_uid"], None), now,
                  item_id))
    forward_outbox.enqueue_study(conn, item["study_uid"],
                                 forward_outbox.destinations(decision.actions),
                                 decision.priority, now)  # the whole study, to its PACS
    worklist.add_history(conn, item_id, now, SYSTEM, "complete", item["state"], item["state"],
                         {"instances": study["num_instances"],
                          "arriving_for_s": round(now - item["created_at"], 3)})
    log.info("study complete", extra={"item_id": item_id, "study_uid": item["study_uid"],
                                      "instances": study["num_instances"]})
    return 1


def _route(item: sqlite3.Row) -> tuple[Any, ...]:
    return (item["workflow"], item["rule"], item["workflow_sha"], item["priority"],
            float(item["sla_minutes"]), item["pool"], item["pool_roles"], item["pool_tags"])


def _route_of(d: engine.Decision) -> tuple[Any, ...]:
    return (d.workflow, d.rule, d.workflow_sha, d.priority, float(d.sla_minutes), d.pool.name,
            ",".join(d.pool.roles), ",".join(d.pool.tags))


def _reroute(conn: sqlite3.Connection, item: sqlite3.Row, decision: engine.Decision,
             now: float) -> None:
    """The whole study matched another rule than its first images: the item takes the new
    priority, SLA (still from the first image), pool and ladder; steps already fired stay."""
    first, pool = float(item["first_received"]), decision.pool
    conn.execute(
        "UPDATE read_items SET priority = ?, priority_rank = ?, sla_minutes = ?, due_at = ?,"
        " pool = ?, pool_roles = ?, pool_tags = ?, workflow = ?, rule = ?, workflow_sha = ?,"
        " actions = ?, hold = ?, updated_at = ? WHERE id = ?",
        (decision.priority, decision.priority_rank, decision.sla_minutes, decision.due_at(first),
         pool.name, ",".join(pool.roles), ",".join(pool.tags), decision.workflow, decision.rule,
         decision.workflow_sha, json.dumps(decision.actions), int(decision.hold), now,
         item["id"]))
    conn.execute("DELETE FROM escalation_steps WHERE item_id = ? AND fired_at IS NULL"
                 " AND skipped_at IS NULL", (item["id"],))
    _insert_steps(conn, item["id"], decision, first)
    worklist.add_history(conn, item["id"], now, SYSTEM, "rerouted", item["state"], item["state"],
                         {"from_rule": item["rule"], "rule": decision.rule,
                          "priority": decision.priority, "sla_minutes": decision.sla_minutes,
                          "pool": pool.name})
    log.info("read item re-routed on completion", extra={
        "item_id": item["id"], "from_rule": item["rule"], "rule": decision.rule})


def _insert_steps(conn: sqlite3.Connection, item_id: int, decision: engine.Decision,
                  first: float) -> None:
    """The ladder's steps, numbered after any step the item already has (fired ones stay)."""
    base = conn.execute("SELECT COALESCE(MAX(step_index) + 1, 0) FROM escalation_steps"
                        " WHERE item_id = ?", (item_id,)).fetchone()[0]
    for index, fire_at, step in decision.step_times(first):
        target: dict[str, Any] = {}
        if step.action == "notify_on_call":
            target = {"on_call": step.on_call, "users": list(step.recipients),
                      "shifts": [sh.to_dict() for sh in step.shifts]}
        elif step.action == "reopen" and step.pool is not None:
            target = step.pool.to_dict()
        conn.execute(
            "INSERT INTO escalation_steps (item_id, step_index, action, target, description,"
            " fire_at) VALUES (?,?,?,?,?,?)",
            (item_id, base + index, step.action, json.dumps(target), step.describe(), fire_at),
        )


def _create_item(conn: sqlite3.Connection, study_uid: str, workflows: list[Workflow],
                 now: float, decision: engine.Decision | None = None) -> int:
    """The study's one read item (``UNIQUE(study_uid)``), not complete yet: the caller
    completes it at once (a quiet study) or when the study goes quiet (a STAT one)."""
    f = study_facts(conn, study_uid)
    decision = decision or engine.decide(workflows, f)
    study = conn.execute("SELECT first_received, num_instances, modalities FROM studies"
                         " WHERE study_uid = ?", (study_uid,)).fetchone()
    first = float(study["first_received"])
    pool = decision.pool
    cur = conn.execute(
        "INSERT INTO read_items (study_uid, state, priority, priority_rank, sla_minutes,"
        " first_received, due_at, created_at, updated_at, pool, pool_roles, pool_tags, workflow,"
        " rule, workflow_sha, actions, hold, modalities, instances_seen, arriving)"
        " VALUES (?, 'queued', ?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?, 1)",
        (study_uid, decision.priority, decision.priority_rank, decision.sla_minutes, first,
         decision.due_at(first), now, now, pool.name, ",".join(pool.roles), ",".join(pool.tags),
         decision.workflow, decision.rule, decision.workflow_sha, json.dumps(decision.actions),
         int(decision.hold), "\\".join(f.modalities), study["num_instances"]),
    )
    item_id = cur.lastrowid
    _insert_steps(conn, item_id, decision, first)
    worklist.add_history(conn, item_id, now, SYSTEM, "created", None, "queued", {
        "workflow": decision.workflow, "rule": decision.rule, "priority": decision.priority,
        "sla_minutes": decision.sla_minutes, "due_at": decision.due_at(first),
        "pool": pool.name, "actions": decision.actions, "instances": study["num_instances"],
    })
    if decision.hold:
        notifications.notify(conn, [{"roles": notifications.FALLBACK_ROLES, "tags": ()}],
                             "triage", f"Held for manual triage: read item {item_id}",
                             f"Rule {decision.rule} holds this study for triage.",
                             item_id=item_id, now=now)
    log.info("read item created", extra={"item_id": item_id, "study_uid": study_uid,
                                         "priority": decision.priority, "rule": decision.rule})
    return item_id


def _attach_late(conn: sqlite3.Connection, row: sqlite3.Row, now: float) -> int:
    """Instances after the item was made: flag the item, tell its reader; never a new item."""
    forward_outbox.follow_late(conn, row["study_uid"], now)  # late instances follow the study
    extra = int(row["num_instances"]) - int(row["instances_seen"])
    if extra <= 0:
        return 0
    conn.execute(
        "UPDATE read_items SET late_instances = late_instances + ?, instances_seen = ?,"
        " late_at = ?, updated_at = ? WHERE id = ?",
        (extra, row["num_instances"], now, now, row["item_id"]),
    )
    worklist.add_history(conn, row["item_id"], now, SYSTEM, "late_instances", row["state"],
                         row["state"], {"added": extra, "total": row["num_instances"]})
    if row["claimed_by"]:
        notifications.notify(conn, [row["claimed_by"]], "late_instances",
                             f"{extra} more image(s) arrived for read item {row['item_id']}",
                             "Images arrived after the study was queued; review them before "
                             "signing.", item_id=row["item_id"], now=now)
    log.info("late instances attached", extra={"item_id": row["item_id"], "added": extra})
    return 1


# -- escalation ----------------------------------------------------------------------------------
def fire_escalations(conn: sqlite3.Connection, now: float) -> int:
    """Fire every due step once; steps of items already read are skipped, not fired."""
    fired = 0
    while True:
        with db.transaction(conn):
            rows = conn.execute(
                "SELECT e.id, e.item_id, e.step_index, e.action, e.target, e.description,"
                " e.fire_at, r.state, r.study_uid, r.priority, r.due_at, r.pool, r.pool_roles,"
                " r.pool_tags, r.claimed_by FROM escalation_steps e JOIN read_items r"
                " ON r.id = e.item_id WHERE e.fired_at IS NULL AND e.skipped_at IS NULL"
                " AND e.fire_at <= ? ORDER BY e.fire_at LIMIT ?", (now, BATCH),
            ).fetchall()
            for row in rows:
                if row["state"] not in worklist.OPEN_STATES:
                    conn.execute("UPDATE escalation_steps SET skipped_at = ? WHERE id = ?",
                                 (now, row["id"]))
                    continue
                done = conn.execute("UPDATE escalation_steps SET fired_at = ? WHERE id = ?"
                                    " AND fired_at IS NULL", (now, row["id"])).rowcount
                if done:
                    _fire(conn, row, now)
                    fired += 1
        if len(rows) < BATCH:
            return fired


def _pool_spec(roles: str, tags: str) -> dict[str, Any]:
    return {"roles": [r for r in roles.split(",") if r], "tags": [t for t in tags.split(",") if t]}


def _minutes_left(row: sqlite3.Row, now: float) -> str:
    left = (row["due_at"] - now) / 60.0
    return f"due in {left:.0f} min" if left >= 0 else f"{-left:.0f} min overdue"


def _fire(conn: sqlite3.Connection, row: sqlite3.Row, now: float) -> None:
    action, item_id = row["action"], row["item_id"]
    target = json.loads(row["target"] or "{}")
    pool = _pool_spec(row["pool_roles"], row["pool_tags"])
    what = f"{row['priority'].upper()} read item {item_id}"
    detail: dict[str, Any] = {"step": row["step_index"], "action": action,
                              "scheduled_at": row["fire_at"]}
    if action == "notify_pool" and row["claimed_by"]:
        # Someone is reading it: remind that reader, not the whole pool.
        sent = notifications.notify(conn, [row["claimed_by"]], "escalation.reminder",
                                    f"{what} you hold is {_minutes_left(row, now)}",
                                    row["description"], item_id, row["id"], now)
    elif action == "notify_pool":
        sent = notifications.notify(conn, [pool], "escalation",
                                    f"{what} is waiting, {_minutes_left(row, now)}",
                                    row["description"], item_id, row["id"], now)
    elif action == "notify_on_call":
        # A rota pages the first person on duty now; the notify ladder pages the next ones.
        who = on_duty_now(target, now)
        recipients = who[:1] if target.get("shifts") else who
        sent = notifications.notify(conn, recipients or [pool], "escalation.on_call",
                                    f"On call: {what} needs a reader, {_minutes_left(row, now)}",
                                    row["description"], item_id, row["id"], now)
    elif action == "reopen":
        # The wider pool may claim it as soon as it is queued; a live claim is kept.
        conn.execute("UPDATE read_items SET pool = ?, pool_roles = ?, pool_tags = ?,"
                     " updated_at = ? WHERE id = ?",
                     (target.get("name", "wider"), ",".join(target.get("roles", [])),
                      ",".join(target.get("tags", [])), now, item_id))
        detail["from_pool"], detail["to_pool"] = row["pool"], target.get("name")
        sent = notifications.notify(conn, [target], "escalation.reopened",
                                    f"{what} is open to you now, {_minutes_left(row, now)}",
                                    row["description"], item_id, row["id"], now)
    else:  # mark_breached
        conn.execute("UPDATE read_items SET breached = 1, breached_at = ?, updated_at = ?"
                     " WHERE id = ? AND breached = 0", (now, now, item_id))
        recipients: list[Any] = [pool] + ([row["claimed_by"]] if row["claimed_by"] else [])
        sent = notifications.notify(conn, recipients, "breach", f"SLA breached: {what}",
                                    row["description"], item_id, row["id"], now)
    detail["notified"] = sent
    worklist.add_history(conn, item_id, now, SYSTEM, f"escalation.{action}", row["state"],
                         row["state"], detail)
    audit.record(conn, SYSTEM, f"read_item.escalation.{action}", row["study_uid"],
                 source="worker", detail={"item_id": item_id, **detail}, ts=now)


# -- the sweep -------------------------------------------------------------------------------------
def run_once(conn: sqlite3.Connection, workflows_dir: Path, now: float,
             quiet_s: float) -> dict[str, int]:
    """One pass over everything due at ``now``; safe to repeat or to die part way."""
    wfs = workflow_set(workflows_dir).refresh(conn, now)
    counts = complete_studies(conn, wfs, now, quiet_s)
    counts["claims_expired"] = worklist.expire_claims(conn, now)
    counts["escalations"] = fire_escalations(conn, now)
    return counts


def sweep(cfg: config.Config, now: float | None = None,
          clock: Clock = time.time) -> dict[str, int] | None:
    """The worker's periodic step. A pass already running in this process is not doubled."""
    if not _LOCK.acquire(blocking=False):
        return None
    try:
        conn = db.connect(cfg.db_path)
        try:
            return run_once(conn, cfg.workflows_dir, clock() if now is None else now,
                            float(cfg["worker"]["quiet_period_s"]))
        finally:
            conn.close()
    finally:
        _LOCK.release()


def loaded_workflows(conn: sqlite3.Connection, directory: Path) -> tuple[list[Workflow],
                                                                           list[str]]:
    """Workflows in force for a directory, read without changing anything (for explain).

    An invalid file contributes its last good version; its problems are returned.
    """
    out, problems = [], []
    for path in WorkflowSet(directory).paths():
        try:
            out.append(parse(path.read_text(encoding="utf-8"), path, accounts.ROLES))
        except (WorkflowError, UnicodeDecodeError, OSError) as e:
            problems.extend(e.problems if isinstance(e, WorkflowError) else [f"{path}: {e}"])
            good = _last_good(conn, path)
            if good is not None:
                out.append(good)
    return out, problems


# -- what other capabilities read of the read queue (they hold no SQL on its tables) ------------
OPEN_STATES = ("queued", "claimed", "preliminary")


def on_call_targets(conn: sqlite3.Connection, item_id: int) -> list[dict[str, Any]]:
    """The item's notify_on_call escalation targets, in ladder order (a critical finding calls
    the people the workflow named)."""
    rows = conn.execute("SELECT target FROM escalation_steps WHERE item_id = ?"
                        " AND action = 'notify_on_call' ORDER BY step_index", (item_id,))
    return [json.loads(r[0] or "{}") for r in rows]


def on_duty_now(target: dict[str, Any], now: float) -> list[str]:
    """The people of a notify_on_call target on duty at ``now`` (local time), in fallback
    order: a rota's covering window, or the plain list of names."""
    if not target.get("shifts"):
        return list(target.get("users", []))
    shifts = [Shift.from_dict(d) for d in target["shifts"]]
    return list(on_duty(shifts, dt.datetime.fromtimestamp(now)))


def on_call_order(conn: sqlite3.Connection, item_id: int, now: float) -> list[str]:
    """Everyone the item's on-call steps name who is on duty at ``now``, ladder order first
    (the notify capability pages them one by one when a page is not acknowledged)."""
    return list(dict.fromkeys(u for t in on_call_targets(conn, item_id)
                              for u in on_duty_now(t, now)))


def counts_by_state(conn: sqlite3.Connection) -> dict[str, int]:
    """Read items per state (the /metrics gauge)."""
    return dict(conn.execute("SELECT state, COUNT(*) FROM read_items GROUP BY state").fetchall())


def overdue_by_priority(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """Open items past their due time, per priority (most urgent first): n and oldest due_at."""
    return [dict(r) for r in conn.execute(
        "SELECT priority, COUNT(*) AS n, MIN(due_at) AS oldest FROM read_items"
        f" WHERE state IN ({','.join('?' * len(OPEN_STATES))}) AND due_at < ?"
        " GROUP BY priority ORDER BY MIN(priority_rank)", (*OPEN_STATES, now))]


def read_totals(conn: sqlite3.Connection) -> dict[str, float]:
    """Since the start: items that breached, reads done and their seconds from arrival to read."""
    breached = conn.execute("SELECT COUNT(*) FROM read_items WHERE breached = 1").fetchone()[0]
    reads, seconds = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(read_at - first_received), 0) FROM read_items"
        " WHERE read_at IS NOT NULL").fetchone()
    return {"breached": breached, "reads": reads, "read_seconds": seconds}


def reads_in_window(conn: sqlite3.Connection, start: float, now: float) -> tuple[int, int]:
    """(reads, late reads) since ``start``; unread items already past due count as both."""
    done, late = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(read_at > due_at), 0) FROM read_items"
        " WHERE read_at IS NOT NULL AND read_at >= ?", (start,)).fetchone()
    overdue = conn.execute(
        "SELECT COUNT(*) FROM read_items WHERE read_at IS NULL AND state IN"
        f" ({','.join('?' * len(OPEN_STATES))}) AND due_at < ? AND due_at >= ?",
        (*OPEN_STATES, now, start)).fetchone()[0]
    return int(done) + int(overdue), int(late) + int(overdue)
