"""``appliance forward``: send a study by hand, and see what waits per destination.

``forward --study-uid UID --to AE`` queues every stored instance of the study (STAT, ahead
of rule-driven work) and runs one sending pass now; the worker finishes whatever is left.
``forward status`` prints per destination the instances waiting, sending, stored (awaiting
proof), delivered (and how it was proved), failed, the oldest waiting and the last error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time

from appliance.core import audit, config, db
from appliance.core.command_line import CliError, actor
from appliance.forwarding import outbox, sending, status
from dicom_node import index as dicom_index


def cmd_forward(args: argparse.Namespace) -> int:
    if getattr(args, "forward_command", None) == "status":
        return cmd_status(args)
    if not args.study_uid or not args.to:
        raise CliError("give --study-uid UID and --to AE (or: appliance forward status)")
    cfg = config.load(args.data_dir)
    names = [n.strip() for n in args.to]
    for name in names:
        peer = cfg.known_ae(name)
        if peer is None or not peer.host:
            raise CliError(f"{name!r} is not a known AE with a host (appliance ae add {name}"
                           " --host H --port P [--commitment])")
    conn = db.open_db(cfg.db_path)
    try:
        if not dicom_index.instances_to_send(conn, study_uid=args.study_uid):
            raise CliError(f"no stored instance of study {args.study_uid}")
        with db.transaction(conn):
            added = outbox.enqueue_study(conn, args.study_uid, names, "stat", origin="manual")
            audit.record(conn, actor(), "forward.request", args.study_uid, source="cli",
                         detail={"to": names, "queued": added})
        counts = sending.run_due(cfg, conn=conn)
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline and _open(conn, args.study_uid):
            time.sleep(0.2)
        summary = outbox.study_summary(conn, args.study_uid)
    finally:
        conn.close()
    if args.json:
        print(json.dumps({"queued": added, "pass": counts, "study": summary}, indent=2))
        return 0
    print(f"queued {added} instance(s); this pass: {counts['stored']} stored,"
          f" {counts['refused']} refused, {counts['retry']} to retry")
    for dest, states in summary.items():
        print(f"  {dest}: " + ", ".join(f"{k} {v}" for k, v in states.items() if v))
    return 0


def _open(conn, study_uid: str) -> bool:
    return any(s["stored"] or s["sending"] for s in outbox.study_summary(conn, study_uid).values())


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_status(args: argparse.Namespace) -> int:
    cfg = config.load(args.data_dir)
    conn = db.open_db(cfg.db_path)
    try:
        rows = status.summary(conn, time.time(), cfg["forwarding"]["failing_alert_min"])
    finally:
        conn.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("nothing forwarded yet")
        return 0
    for d in rows:
        proved = ", ".join(f"{k} {v}" for k, v in d["proved_by"].items()) or "-"
        print(f"{d['destination']}: waiting {d['waiting']}, sending {d['sending']}, stored"
              f" {d['stored']}, delivered {d['delivered']} (proved by {proved}), failed"
              f" {d['failed']}; oldest waiting {_when(d['oldest_waiting_at'])}"
              f"{'; FAILING since ' + _when(d['failing_since']) if d['alert'] else ''}")
        if d["last_error"]:
            print(f"  last error: {d['last_error']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forward", help="send a study to a site PACS now; forward status",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--data-dir", help="data directory (or APPLIANCE_DATA_DIR)")
    p.add_argument("--study-uid", help="the study to send")
    p.add_argument("--to", action="append", help="destination AE title (repeatable)")
    p.add_argument("--wait", type=float, default=0.0,
                   help="seconds to wait for the proof of delivery (default: do not wait)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    s = p.add_subparsers(dest="forward_command", metavar="status")
    st = s.add_parser("status", help="per destination: waiting, sending, delivered, failed")
    st.add_argument("--data-dir", default=argparse.SUPPRESS,
                    help="data directory (or APPLIANCE_DATA_DIR)")
    st.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="machine-readable output")
    p.set_defaults(func=cmd_forward)


REGISTER = [register]
