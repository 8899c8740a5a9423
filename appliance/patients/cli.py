"""``appliance patient list|show|register|trauma|order|wristband|link|merge|unlink|fix-study|
superseded``: the registration desk and reconciliation from a shell.

Every command takes ``--json``; every registration is audited with the operator's login
name (``cli`` source).  A typing error is one ``error:`` line and nothing is written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from appliance.core import audit, config, db
from appliance.core.command_line import CliError, actor, data_dir_arg
from appliance.patients import reconciliation, registry, superseded, wristband
from appliance.patients.registry import RegistrationError
from appliance.reports import corrections
from dicom_node import correction as dicom_correction


def _open(args: argparse.Namespace):
    cfg = config.load(config.resolve_data_dir(args.data_dir))
    return cfg, db.open_db(cfg.db_path), registry.Site.from_config(cfg)


def _print(args: argparse.Namespace, value: Any, text: str) -> None:
    print(json.dumps(value, indent=2) if args.json else text)


def _line(p: dict[str, Any]) -> str:
    flags = " (temporary)" if p["temporary"] else ""
    if p.get("merged_into"):
        flags += f" (merged into #{p['merged_into']})"
    return f"{p['patient_id']:<16} {p['name']:<28} {p['sex'] or '-':<2} " \
           f"{p['birth_date'] or p['age'] or '-':<9}{flags}"


def _scheduled(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"--at {text!r}: use YYYY-MM-DDTHH:MM") from None


def _order_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--procedure", help="procedure code from the site list (CTHEAD, CRCHEST …)")
    p.add_argument("--priority", default="ROUTINE", help="STAT, HIGH, ROUTINE, MEDIUM or LOW")
    p.add_argument("--reason", default="", help="reason for exam")
    p.add_argument("--clinical", default="", help="clinical details for the reader")
    p.add_argument("--station", default="", help="scheduled station AE title (the scanner)")
    p.add_argument("--at", help="scheduled start, YYYY-MM-DDTHH:MM (default now)")


def _maybe_order(conn, site, ref: int, args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.procedure:
        return None
    return registry.add_order(conn, site, ref, actor=actor(), procedure=args.procedure,
                              priority=args.priority, reason=args.reason,
                              clinical_details=args.clinical, station_ae=args.station,
                              scheduled=_scheduled(args.at), source="cli")


def _run(fn):
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except RegistrationError as e:
            raise CliError(str(e)) from None
    return wrapped


@_run
def cmd_register(args: argparse.Namespace) -> int:
    cfg, conn, site = _open(args)
    try:
        with db.transaction(conn):
            p = registry.register(conn, site, actor=actor(), name=args.name,
                                  patient_id=args.id or "", birth=args.birth or "",
                                  estimated_age=args.age or "", sex_code=args.sex or "",
                                  source="cli")
            o = _maybe_order(conn, site, p["id"], args)
    finally:
        conn.close()
    _print(args, {"patient": p, "order": o},
           f"registered {_line(p)}" + (f"\n  order {o['accession']} {o['procedure_name']}"
                                       if o else ""))
    return 0


@_run
def cmd_trauma(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= 200:
        raise CliError("--count: between 1 and 200")
    cfg, conn, site = _open(args)
    out = []
    try:
        for _ in range(args.count):
            with db.transaction(conn):
                p = registry.register_trauma(conn, site, actor=actor(), sex_code=args.sex or "",
                                             age_band=args.age_band, source="cli")
                out.append({"patient": p, "order": _maybe_order(conn, site, p["id"], args)})
    finally:
        conn.close()
    if args.wristbands:
        folder = Path(args.wristbands)
        folder.mkdir(parents=True, exist_ok=True)
        for item in out:
            path = folder / f"{item['patient']['patient_id']}.pdf"
            path.write_bytes(wristband.pdf(item["patient"], cfg["site"]["name"]))
            item["wristband"] = str(path)
    _print(args, out if args.count > 1 else out[0],
           "\n".join(f"registered {_line(i['patient'])}" for i in out))
    return 0


@_run
def cmd_order(args: argparse.Namespace) -> int:
    if not args.procedure:
        raise CliError("--procedure is required")
    cfg, conn, site = _open(args)
    try:
        p = registry.find(conn, args.patient)
        o = _maybe_order(conn, site, p["id"], args)
    finally:
        conn.close()
    _print(args, o, f"order {o['accession']} {o['procedure_name']} for {p['patient_id']}"
                    f" (Study Instance UID {o['study_uid']})")
    return 0


@_run
def cmd_list(args: argparse.Namespace) -> int:
    cfg, conn, site = _open(args)
    try:
        rows = registry.listing(conn, temporary_only=args.temporary, limit=args.limit)
    finally:
        conn.close()
    _print(args, rows, "\n".join(_line(p) for p in rows) or "no patients registered")
    return 0


def _report_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line a signed report or addendum, then what supersedes it (as the report page's
    banner says it)."""
    out = []
    for r in rows:
        name = f"report {r['id']}" if r["kind"] == "report" else \
            f"addendum {r['id']} to report {r['parent_id']}"
        out.append(f"  {name:<26} {r['status']:<12} by {r['author']}  study {r['study_uid']}")
        if r["superseded_by"]:
            out.append(f"    {corrections.sentence(r['superseded_by'])}")
    return out


@_run
def cmd_show(args: argparse.Namespace) -> int:
    cfg, conn, site = _open(args)
    try:
        p = registry.find(conn, args.patient)
        p["orders"] = registry.orders_of(conn, p["id"])
        p["reports"] = corrections.of_studies(
            conn, dicom_correction.studies_of_patient(conn, p["patient_id"]))
        audit.record(conn, actor(), "patient.view", p["patient_id"], source="cli",
                     detail={"orders": len(p["orders"]), "reports": len(p["reports"])})
    finally:
        conn.close()
    text = [_line(p)] + [f"  {o['accession']:<16} {o['procedure_name']:<24} {o['modality']:<3}"
                         f" {o['priority']:<8} {o['status']:<13} {o['reason']}"
                         for o in p["orders"]] + _report_lines(p["reports"])
    _print(args, p, "\n".join(text))
    return 0


@_run
def cmd_wristband(args: argparse.Namespace) -> int:
    cfg, conn, site = _open(args)
    try:
        p = registry.find(conn, args.patient)
    finally:
        conn.close()
    data = wristband.pdf(p, cfg["site"]["name"])
    if args.out == "-":
        sys.stdout.buffer.write(data)
    else:
        Path(args.out).write_bytes(data)
        print(f"wristband of {p['patient_id']} written to {args.out}")
    return 0


def _reconcile(args: argparse.Namespace, run) -> int:
    cfg, conn, site = _open(args)
    try:
        result = run(cfg, conn)
    finally:
        conn.close()
    what = "nothing changed (already done)" if result.get("replayed") else \
        f"{result['instances']} instances corrected, " \
        f"{len(result.get('reports_reissued', []))} reports re-issued"
    _print(args, result, what)
    return 0


@_run
def cmd_link(args: argparse.Namespace) -> int:
    kind = "merge" if args.patient_command == "merge" else "link"
    return _reconcile(args, lambda cfg, conn: reconciliation.link(
        cfg, conn, args.source, args.target, actor=actor(), reason=args.reason, kind=kind,
        source="cli"))


@_run
def cmd_unlink(args: argparse.Namespace) -> int:
    return _reconcile(args, lambda cfg, conn: reconciliation.unlink(
        cfg, conn, args.source, actor=actor(), reason=args.reason, source="cli"))


@_run
def cmd_fix_study(args: argparse.Namespace) -> int:
    return _reconcile(args, lambda cfg, conn: reconciliation.fix_study(
        cfg, conn, args.study_uid, args.patient, actor=actor(), reason=args.reason,
        source="cli"))


STATE_WORDS = {"waiting": "waiting for the corrected copy", "manual": "for the PACS administrator",
               "removed": "removed", "absent": "none held", "obsolete": "current again"}


def _superseded_text(cfg: config.Config, rows: list[dict[str, Any]],
                     counts: dict[str, dict[str, int]]) -> str:
    """Per destination a count line, then each row: what to remove, under which old ID."""
    if not counts:
        return "no copies superseded by a reconciliation"
    out = []
    for dest, states in sorted(counts.items()):
        ae = cfg.known_ae(dest)
        how = "Orthanc REST API" if ae and ae.orthanc_url else "no REST API: C-FIND checks"
        out.append(f"{dest} ({how}): " + ", ".join(f"{states[k]} {STATE_WORDS[k]}"
                                                   for k in superseded.STATES))
        for r in (r for r in rows if r["destination"] == dest):
            note = f"  [{r['last_error']}]" if r["last_error"] else ""
            out.append(f"  #{r['id']:<6} {r['state']:<8} {r['kind']:<6} {r['old_patient_id']}"
                       f" -> {r['patient_id'] or '?'}  study {r['study_uid']}  series"
                       f" {r['series_uid']}  sop {r['sop_uid']}{note}")
    return "\n".join(out)


@_run
def cmd_superseded(args: argparse.Namespace) -> int:
    cfg, conn, site = _open(args)
    try:
        if args.to and cfg.known_ae(args.to) is None and args.to not in superseded.summary(conn):
            raise CliError(f"no known AE named {args.to!r}")
        rows = superseded.listing(conn, args.to, every=args.all, limit=args.limit)
        counts = {d: c for d, c in superseded.summary(conn).items()
                  if not args.to or d == args.to}
        audit.record(conn, actor(), "patient.superseded.list", args.to or "", source="cli",
                     detail={"rows": len(rows), "all": args.all})
    finally:
        conn.close()
    _print(args, {"destinations": counts, "copies": rows},
           _superseded_text(cfg, rows, counts))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    top = sub.add_parser("patient", help="registration desk: patients, trauma identities, orders")
    cmds = top.add_subparsers(dest="patient_command", metavar="ACTION")
    cmds.required = True

    def add(name: str, func, text: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=text, description=text)
        data_dir_arg(p)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)
        return p

    p = add("register", cmd_register, "register a patient (and optionally an order)")
    p.add_argument("name", help="FAMILY^GIVEN (or 'Family, Given')")
    p.add_argument("--id", help="the patient's ID (none: the desk issues PREFIX-P0001)")
    p.add_argument("--birth", help="birth date YYYY-MM-DD")
    p.add_argument("--age", help="estimated age in years, when the birth date is unknown")
    p.add_argument("--sex", help="M, F or O")
    _order_args(p)
    p = add("trauma", cmd_trauma, "register unidentified casualties: temporary identities")
    p.add_argument("--sex", help="estimated sex: M, F or O")
    p.add_argument("--age-band", default="unknown", help=", ".join(registry.AGE_BANDS))
    p.add_argument("--count", type=int, default=1, help="how many to register at once")
    p.add_argument("--wristbands", metavar="DIR", help="write each wristband PDF into DIR")
    _order_args(p)
    p = add("order", cmd_order, "schedule a procedure for a registered patient")
    p.add_argument("patient", help="Patient ID")
    _order_args(p)
    p = add("list", cmd_list, "registered patients, newest first")
    p.add_argument("--temporary", action="store_true", help="only temporary identities not "
                                                           "yet reconciled")
    p.add_argument("--limit", type=int, default=500)
    p = add("show", cmd_show, "one patient, their orders and the signed reports of their"
                              " studies (and what superseded them)")
    p.add_argument("patient", help="Patient ID")
    p = add("wristband", cmd_wristband, "write a patient's wristband PDF")
    p.add_argument("patient", help="Patient ID")
    p.add_argument("--out", required=True, help="file to write ('-': standard output)")
    for name, text in (("link", "join a temporary identity to the real patient's record"),
                       ("merge", "merge two records of one person (the first into the second)")):
        p = add(name, cmd_link, text)
        p.add_argument("source", help="Patient ID that goes away (e.g. CAMPN-T0007)")
        p.add_argument("target", help="Patient ID that stays")
        p.add_argument("--reason", required=True, help="why (audited)")
    p = add("unlink", cmd_unlink, "undo the link or merge of a Patient ID")
    p.add_argument("source", help="the Patient ID that was linked")
    p.add_argument("--reason", required=True, help="why (audited)")
    p = add("fix-study", cmd_fix_study, "give one study a registered patient's identity "
                                        "(a name typed wrong on the scanner)")
    p.add_argument("study_uid")
    p.add_argument("patient", help="the registered Patient ID the study belongs to")
    p.add_argument("--reason", required=True, help="why (audited)")
    p = add("superseded", cmd_superseded,
            "copies destinations hold under an identity a reconciliation replaced: waiting"
            " for the corrected copy, or left to the PACS administrator (no REST API)")
    p.add_argument("--to", metavar="AE", help="only this destination")
    p.add_argument("--all", action="store_true",
                   help="also the copies removed, none held, or current again")
    p.add_argument("--limit", type=int, default=10_000)


REGISTER = [register]
