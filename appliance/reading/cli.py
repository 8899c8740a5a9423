"""``appliance workflow``: validate workflow files, explain a routing, show what is in force."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from appliance.accounts import users as accounts
from appliance.core import config
from appliance.core.command_line import CliError, actor, data_dir_arg
from workflows import engine
from workflows.schema import WorkflowError, load


def cmd_validate(args: argparse.Namespace) -> int:
    """Check each file; print every problem as file:line:column: what; exit 1 on any."""
    bad = 0
    for name in args.files:
        try:
            wf = load(name, accounts.ROLES)
        except WorkflowError as e:
            bad += 1
            for problem in e.problems:
                print(problem, file=sys.stderr)
            continue
        print(f"{name}: ok (workflow {wf.name}, {len(wf.rules)} rules, order {wf.order})")
    if bad:
        print(f"{bad} of {len(args.files)} file(s) invalid", file=sys.stderr)
    return 1 if bad else 0


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _facts_for(args: argparse.Namespace, conn) -> list[engine.StudyFacts]:
    from appliance.reading import read_queue
    from workflows import facts

    if args.study_uid:
        f = read_queue.study_facts(conn, args.study_uid)
        if f is None:
            raise CliError(f"no stored study {args.study_uid!r} (try --dicom-dir for files not "
                           "yet sent)")
        return [f]
    directory = Path(args.dicom_dir)
    if not directory.is_dir():
        raise CliError(f"{directory}: not a directory")
    found = facts.from_dicom_dir(directory, calling_ae=args.calling_ae or "",
                                 received_at=time.time())
    if not found:
        raise CliError(f"{directory}: no DICOM files with a Study Instance UID")
    return list(found.values())


def _explain_one(f: engine.StudyFacts, d: engine.Decision) -> dict[str, Any]:
    first = f.received_at
    return {
        "study_uid": f.study_uid,
        "facts": {"modalities": f.modalities, "body_parts": f.body_parts,
                  "study_description": f.study_description,
                  "series_descriptions": f.series_descriptions, "calling_ae": f.calling_ae,
                  "institution": f.institution, "age_years": f.age_years,
                  "first_received": first},
        "rules": [t.__dict__ for t in d.trace],
        "result": {"workflow": d.workflow, "rule": d.rule, "priority": d.priority,
                   "sla_minutes": d.sla_minutes, "due_at": d.due_at(first),
                   "pool": d.pool.to_dict(), "actions": d.actions,
                   "escalation": [{"at": t, "step": s.describe(), **_on_call_now(s)}
                                  for _, t, s in d.step_times(first)]},
    }


def _on_call_now(step: Any) -> dict[str, Any]:
    """Who a notify_on_call step would page now: the rota's first on duty, then the rest."""
    if step.action != "notify_on_call":
        return {}
    from workflows.schema import on_duty

    who = (list(on_duty(step.shifts, dt.datetime.now())) if step.shifts
           else list(step.recipients))
    return {"on_call_now": who, "rota": bool(step.shifts)}


def _print_explain(e: dict[str, Any]) -> None:
    f, r = e["facts"], e["result"]
    age = "unknown" if f["age_years"] is None else f"{f['age_years']:.1f} years"
    print(f"study {e['study_uid']}")
    print(f"  modality {', '.join(f['modalities']) or '-'}; body part "
          f"{', '.join(f['body_parts']) or '-'}; description {f['study_description']!r}")
    print(f"  series {', '.join(repr(s) for s in f['series_descriptions']) or '-'}; calling AE "
          f"{f['calling_ae'] or '-'}; institution {f['institution'] or '-'}; age {age}; "
          f"first image {_when(f['first_received'])}")
    print("rules, in the order tried:")
    for t in e["rules"]:
        mark = "MATCHED" if t["matched"] else ("skipped" if t["note"] else "no match")
        line = f" (line {t['line']})" if t["line"] else ""
        print(f"  {t['workflow']} / {t['rule']}{line}: {mark}"
              f"{' - ' + t['note'] if t['note'] else ''}")
        for reason in t["reasons"]:
            print(f"      {reason}")
    pool = r["pool"]
    tags = f", tags {', '.join(pool['tags'])}" if pool["tags"] else ""
    print(f"result: rule {r['rule']} ({r['workflow']}): priority {r['priority']}, "
          f"SLA {r['sla_minutes']:g} min, due {_when(r['due_at'])}")
    print(f"  pool {pool['name']} (role {' or '.join(pool['roles'])}{tags})")
    for step in r["escalation"]:
        print(f"  escalation {_when(step['at'])}: {step['step']}")
        if "on_call_now" in step:
            who = step["on_call_now"]
            order = (f"{who[0]}, then {', '.join(who[1:])}" if step["rota"] and len(who) > 1
                     else ", ".join(who))
            print(f"      paged if it fired now: {order or 'nobody on duty (the pool instead)'}")
    for action in r["actions"]:
        key, value = next(iter(action.items()))
        print(f"  action {key}: {value}")


def cmd_explain(args: argparse.Namespace) -> int:
    """Which rule matched a study and why, which did not and why not, and the result."""
    from appliance.core import audit, db
    from appliance.reading import read_queue

    cfg = config.load(args.data_dir)
    conn = db.open_db(cfg.db_path)
    try:
        study_facts = _facts_for(args, conn)
        wfs, problems = read_queue.loaded_workflows(conn, cfg.workflows_dir)
        out = []
        for f in study_facts:
            out.append(_explain_one(f, engine.decide(wfs, f)))
            audit.record(conn, actor(), "workflow.explain", f.study_uid,
                         source="cli", detail={"from": "index" if args.study_uid else "files"})
    finally:
        conn.close()
    for p in problems:
        print(f"warning: {p} (last good version used)", file=sys.stderr)
    if args.json:
        print(json.dumps(out if len(out) > 1 else out[0], indent=2, default=str))
        return 0
    print("workflows in force: " + (", ".join(f"{w.name} ({Path(w.path).name}, order {w.order})"
                                              for w in engine.ordered(wfs)) or
                                    "none (built-in fallback)"))
    for e in out:
        _print_explain(e)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Workflow files as the worker last saw them: version in force and the last error."""
    from appliance.core import db

    cfg = config.load(args.data_dir)
    conn = db.open_db(cfg.db_path)
    try:
        rows = [dict(r) for r in conn.execute(
            "SELECT filename, active_sha, active_since, last_error, last_error_at, checked_at"
            " FROM workflow_files ORDER BY filename")]
    finally:
        conn.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no workflow file loaded yet (is the worker running? files in {cfg.workflows_dir})")
    for r in rows:
        state = f"in force {r['active_sha'][:12]} since {_when(r['active_since'])}" \
            if r["active_sha"] else "NOT in force (no good version)"
        print(f"{r['filename']}: {state}")
        if r["last_error"]:
            print(f"  last edit rejected at {_when(r['last_error_at'])}:")
            for line in r["last_error"].splitlines():
                print(f"    {line}")
    return 1 if any(r["last_error"] for r in rows) else 0


def register(sub: argparse._SubParsersAction) -> None:
    wf = sub.add_parser("workflow", help="check and explain routing workflows (YAML)")
    wf_sub = wf.add_subparsers(dest="workflow_command", metavar="ACTION")
    wf_sub.required = True

    p = wf_sub.add_parser("validate", help="check workflow files; exit 1 on any problem",
                          description="Check workflow files. Each problem is printed as "
                                      "file:line:column: what is wrong.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = wf_sub.add_parser("explain", help="which rule routes a study, and why",
                          description="Show which rule matches a study and why, which did not "
                                      "and why not, and the priority, SLA, due time and pool.")
    data_dir_arg(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study-uid", metavar="UID", help="a study already stored")
    which.add_argument("--dicom-dir", metavar="DIR", help="DICOM files not yet stored")
    p.add_argument("--calling-ae", help="with --dicom-dir: the AE title that will send them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_explain)

    p = wf_sub.add_parser("status", help="workflow versions in force and rejected edits")
    data_dir_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


REGISTER = [register]
