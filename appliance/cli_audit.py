"""``appliance audit verify`` and ``appliance audit export``: the privacy officer's tools.

``verify`` walks the hash chain and names the first row that was edited,
deleted or relinked; it exits 2 when the chain is broken, so a cron job or
the sync engineer's bundle step can refuse to ship a tampered log.
``export`` writes JSON lines (one audit row per line), to stdout or a file
written atomically; the export itself is audited.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time

from appliance import audit, config, db
from appliance.cli import CliError
from appliance.cli_accounts import actor
from dicom_node import durable

BROKEN_EXIT = 2


def parse_since(text: str, now: float | None = None) -> float:
    """``2026-11-28``, ``2026-11-28T14:00`` (UTC unless an offset is given), ``24h``/``7d`` ago,
    or epoch seconds → epoch seconds."""
    text = (text or "").strip()
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+)\s*([mhdw])", text)
    if m:
        return now - int(m.group(1)) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    if re.fullmatch(r"\d{9,}(\.\d+)?", text):
        return float(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"bad --since {text!r}: use 2026-11-28, 2026-11-28T14:00, 24h or 7d") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = config.load(args.data_dir)
    conn = db.connect(cfg.db_path, readonly=True)
    try:
        ok, message, _n = audit.verify(conn)
        head = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        conn.close()
    if ok:
        # The head lets a responder notice a truncated tail later: note it, compare it.
        print(f"{message}; last row {head[0]} hash {head[1][:16]}" if head else message)
        return 0
    print(f"AUDIT CHAIN BROKEN: {message}", file=sys.stderr)
    return BROKEN_EXIT


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def cmd_export(args: argparse.Namespace) -> int:
    since = parse_since(args.since)
    cfg = config.load(args.data_dir)
    conn = db.open_db(cfg.db_path)
    try:
        lines, count = [], 0
        for row in audit.rows(conn, since):
            row["time"] = _iso(row["ts"])
            lines.append(json.dumps(row, sort_keys=True, ensure_ascii=False))
            count += 1
        body = "".join(line + "\n" for line in lines)
        if args.out:
            durable.atomic_write(args.out, body.encode("utf-8"), mode=0o600)
        else:
            sys.stdout.write(body)
            sys.stdout.flush()
        audit.record(conn, actor(), "audit.export", args.out or "stdout", source="cli",
                     detail={"since": since, "rows": count})
    finally:
        conn.close()
    if args.out:
        print(f"wrote {count} audit rows to {args.out}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p_audit = sub.add_parser("audit", help="verify or export the hash-chained audit trail")
    s = p_audit.add_subparsers(dest="audit_command", metavar="ACTION")
    s.required = True
    p = s.add_parser("verify", help="check every link; name the first broken row")
    p.add_argument("--data-dir", metavar="DIR", help="the site's data directory")
    p.set_defaults(func=cmd_verify)
    p = s.add_parser("export", help="write audit rows as JSON lines")
    p.add_argument("--data-dir", metavar="DIR", help="the site's data directory")
    p.add_argument("--since", required=True,
                   help="from when: 2026-11-28, 2026-11-28T14:00 (UTC), 24h, 7d or epoch seconds")
    p.add_argument("--out", metavar="FILE", help="write here (0600) instead of stdout")
    p.set_defaults(func=cmd_export)


REGISTER = [register]
