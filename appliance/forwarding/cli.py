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
from appliance.forwarding import outbox, progress, sending, status
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



# -- hand-back ------------------------------------------------------------------------------------
def _since(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        raise CliError(f"--since {text!r}: expected a date such as 2026-07-01") from None


def bar_line(s: progress.Snapshot, width: int = 30) -> str:
    """The terminal bar for a snapshot: instances and MB sent of planned, rate, time left
    (the figures the status page's hand-back panel shows, read from the same row)."""
    fill = int(width * s.instances_sent / s.instances_planned) if s.instances_planned else width
    return (f"[{'#' * fill}{'.' * (width - fill)}] {s.instances_sent}/{s.instances_planned}"
            f" instances, {s.bytes_sent / 1e6:.1f}/{s.bytes_planned / 1e6:.1f} MB,"
            f" {s.rate_bytes_s / 1e6:.1f} MB/s ({s.rate_instances_s:.0f}/s),"
            f" {progress.duration_text(s.seconds_left)} left"
            + (f", reports {s.reports_sent}/{s.reports_planned}" if s.reports_planned else ""))


def _bar(s: progress.Snapshot) -> None:
    """One self-overwriting line on a terminal (nothing when stderr is not one)."""
    import sys

    if not sys.stderr.isatty():
        return
    sys.stderr.write(f"\r{bar_line(s)} ")
    if s.state != "running":
        sys.stderr.write("\n")
    sys.stderr.flush()


def _end_bar(args: argparse.Namespace) -> None:
    """End the bar's line before an error is printed under it."""
    import sys

    if not args.json and sys.stderr.isatty():
        sys.stderr.write("\n")


def cmd_handback(args: argparse.Namespace) -> int:
    from appliance.forwarding import handback, manifest

    if getattr(args, "handback_command", None) == "verify":
        return cmd_handback_verify(args)
    if not args.to:
        raise CliError("give --to AE (the restored PACS), or: appliance handback verify")
    cfg = config.load(args.data_dir)
    conn = db.open_db(cfg.db_path)
    try:
        result = handback.run(conn, cfg, args.to.strip(), _since(args.since), args.dry_run,
                              None if args.json else _bar, actor())
    except (handback.HandbackError, manifest.ManifestError) as e:
        _end_bar(args)
        raise CliError(str(e)) from None
    finally:
        conn.close()
    code = 0 if args.dry_run or not result["not_delivered"] else 1
    if args.json:
        print(json.dumps(result, indent=2))
        return code
    print(f"{result['instances']} instance(s) here; {result['already_held']} already on"
          f" {result['destination']}; {result['to_send']} to send"
          f" ({result['bytes_to_send'] / 1e6:.1f} MB)")
    if not args.dry_run:
        print(f"sent {result['sent']}; {result['report_documents']} report document(s);"
              f" not delivered {result['not_delivered']}; manifest {result['manifest']}")
    return code


def cmd_handback_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from appliance.forwarding import handback, manifest

    if args.host:
        cfg = config.Config(Path("."), config.parse("{}", Path("<defaults>")))
        url = (args.dicomweb_url or "").strip().rstrip("/")
        msg = config._dicomweb_url(url)
        if msg:
            raise CliError(f"--dicomweb-url {msg}")  # not repeated: it may hold a password
        peer = config.KnownAE(name=args.to.strip(), host=args.host, port=args.port,
                              dicomweb_url=url)
    else:
        cfg = config.load(args.data_dir)
        peer = cfg.known_ae(args.to.strip())
        if peer is None or not peer.host:
            raise CliError(f"{args.to!r} is not a known AE with a host (or give --host --port)")
    key_path = Path(args.public_key) if args.public_key else cfg.keys_dir / "identity.pub"
    try:
        result = handback.verify(cfg, Path(args.manifest), key_path.read_bytes(), peer,
                                 args.calling_ae)
    except OSError as e:
        raise CliError(f"cannot read {e.filename}: {e.strerror}") from None
    except (handback.HandbackError, manifest.ManifestError) as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"signature ok; {result['instances']} instance(s) and"
              f" {result['report_documents']} report document(s) listed;"
              f" {len(result['missing'])} missing on {peer.name}")
        for m in result["missing"]:
            print(f"missing {m['sop_instance_uid']} (study {m['study_instance_uid']},"
                  f" series {m['series_instance_uid']})")
    return 1 if result["missing"] else 0


def register_handback(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("handback", help="return to service: send the PACS what it lacks, with a"
                                        " signed manifest; handback verify")
    p.add_argument("--data-dir", help="data directory (or APPLIANCE_DATA_DIR)")
    p.add_argument("--to", help="the restored PACS (a known AE)")
    p.add_argument("--since", help="only instances received since this date (YYYY-MM-DD, UTC)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be sent")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    s = p.add_subparsers(dest="handback_command", metavar="verify")
    v = s.add_parser("verify", help="check a manifest's signature and that the PACS holds all")
    v.add_argument("manifest", help="the manifest JSON file")
    v.add_argument("--to", required=True, help="the PACS AE title")
    v.add_argument("--data-dir", default=argparse.SUPPRESS, help="data directory (known AEs,"
                   " keys/identity.pub)")
    v.add_argument("--host", help="the PACS address (instead of a data directory)")
    v.add_argument("--port", type=int, default=104, help="the PACS port (with --host)")
    v.add_argument("--dicomweb-url", metavar="URL", help="with --host: ask the PACS by QIDO-RS"
                   " at this DICOMweb root instead of C-FIND")
    v.add_argument("--calling-ae", help="our AE title towards the PACS (default: the site's)")
    v.add_argument("--public-key", help="the appliance's identity.pub (default: the data"
                   " directory's)")
    v.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_handback)


REGISTER = [register, register_handback]
