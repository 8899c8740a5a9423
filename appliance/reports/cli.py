"""``appliance reports deliveries|retry``: the responder's view of reports going back to the site.

When the site PACS was down, deliveries wait with a growing delay (at most
``reports.retry_max_backoff_s``). ``deliveries`` shows what waits and why;
``retry`` makes waiting deliveries due now (the worker sends them at its next
sweep, within seconds), for when the responder knows the PACS is back.
No patient data is printed: rows name reports and destinations only (a report an identity
correction superseded names the correction addendum's id, not the identity).
"""

from __future__ import annotations

import argparse
import json
import time

from appliance.core import audit, config, db
from appliance.core.command_line import CliError, actor, data_dir_arg
from appliance.reports import corrections


def _ago(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_deliveries(args: argparse.Namespace) -> int:
    cfg = config.load(args.data_dir)
    conn = db.open_db(cfg.db_path)
    try:
        where = "" if args.all else "WHERE state = 'pending'"
        rows = [dict(r) for r in conn.execute(
            "SELECT id, report_id, read_item_id, format, destination, state, attempts,"
            f" next_attempt_at, last_error, created_at, delivered_at FROM deliveries {where}"
            " ORDER BY id DESC LIMIT ?", (args.limit,))]
        marks = corrections.for_report_ids(conn, [r["report_id"] for r in rows])
    finally:
        conn.close()
    for r in rows:  # an addendum id, never the identity: this listing names no patient
        r["superseded_by"] = (marks.get(r["report_id"]) or {}).get("addendum_id")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no deliveries waiting" if not args.all else "no deliveries yet")
        return 0
    now = time.time()
    print(f"{'id':>5}  {'report':>6}  {'format':<7}{'to':<17}{'state':<10}{'tries':>5}  when")
    for r in rows:
        if r["state"] == "pending":
            due = r["next_attempt_at"] - now
            when = f"next try in {_ago(due)}" if due > 0 else "due now"
        else:
            when = f"delivered {_ago(now - (r['delivered_at'] or now))} ago"
        print(f"{r['id']:>5}  {r['report_id']:>6}  {r['format']:<7}{r['destination']:<17}"
              f"{r['state']:<10}{r['attempts']:>5}  {when}")
        if r["state"] == "pending" and r["last_error"]:
            print(f"{'':>7}last error: {r['last_error']}")
        if r["superseded_by"]:
            print(f"{'':>7}report {r['report_id']} is superseded by identity correction"
                  f" addendum {r['superseded_by']}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    if not args.ids and not args.all:
        raise CliError("name delivery ids (appliance reports deliveries) or pass --all")
    cfg = config.load(args.data_dir)
    conn = db.open_db(cfg.db_path)
    now = time.time()
    try:
        with db.transaction(conn):
            if args.all:
                ids = [r[0] for r in conn.execute(
                    "SELECT id FROM deliveries WHERE state = 'pending'")]
            else:
                known = {r[0]: r[1] for r in conn.execute(
                    f"SELECT id, state FROM deliveries WHERE id IN ({','.join('?' * len(args.ids))})",
                    args.ids)}
                missing = [i for i in args.ids if i not in known]
                if missing:
                    raise CliError(f"no delivery {', '.join(map(str, missing))}")
                ids = [i for i in args.ids if known[i] == "pending"]
            for i in ids:
                conn.execute("UPDATE deliveries SET next_attempt_at = ? WHERE id = ?"
                             " AND state = 'pending'", (now, i))
            audit.record(conn, actor(), "report.deliver_retry", "deliveries", source="cli",
                         detail={"ids": ids}, ts=now)
    finally:
        conn.close()
    print(f"{len(ids)} deliver{'y' if len(ids) == 1 else 'ies'} due now; the worker sends "
          "them at its next sweep")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p_rep = sub.add_parser("reports", help="signed reports going back to the site PACS")
    s = p_rep.add_subparsers(dest="reports_command", metavar="ACTION")
    s.required = True
    p = s.add_parser("deliveries", help="deliveries waiting (or all with --all), with errors")
    data_dir_arg(p)
    p.add_argument("--all", action="store_true", help="also the delivered ones")
    p.add_argument("--limit", type=int, default=100, help="at most this many rows (newest)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_deliveries)
    p = s.add_parser("retry", help="make waiting deliveries due now (the PACS is back)")
    data_dir_arg(p)
    p.add_argument("ids", nargs="*", type=int, metavar="ID", help="delivery ids")
    p.add_argument("--all", action="store_true", help="every waiting delivery")
    p.set_defaults(func=cmd_retry)


REGISTER = [register]
