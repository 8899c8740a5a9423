"""CLI: ``appliance provision`` (guided site set-up), ``appliance logs``, ``appliance migrate``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from appliance.core import config
from appliance.core.command_line import CliError, data_dir_arg
from appliance.setup.provision import ProvisionError

# -- provision -------------------------------------------------------------------------------
QUESTIONS: list[tuple[str, str, str]] = [
    ("site_name", "Site name (shown on every page and report)", ""),
    ("ae_title", "This appliance's DICOM AE title", "FIELDAPP"),
    ("dicom_port", "DICOM port", "11112"),
    ("web_port", "HTTPS port", "8443"),
    ("allowed_modalities", "Modalities the site sends (e.g. CT MR CR; empty = any)", ""),
    ("cloud.target", "Cloud target: none, s3 or folder", "none"),
    ("site_pacs", "Site PACS for reports, as AE@host:port (empty = none)", ""),
    ("readers", "Readers to invite, as user:role[:Name] separated by commas (empty = none)", ""),
]
CLOUD_QUESTIONS = {
    "s3": [("url", "S3 endpoint URL (empty = AWS)", ""), ("region", "Region", "us-east-1"),
           ("bucket", "Bucket", ""), ("prefix", "Key prefix", "")],
    "folder": [("folder", "Folder (absolute path, e.g. a USB disk)", "")],
}


def _ask(prompt: str, default: str, inp: TextIO, out: TextIO) -> str:
    out.write(f"{prompt}{f' [{default}]' if default else ''}: ")
    out.flush()
    line = inp.readline()
    if not line:
        raise CliError("no answer (input ended); pass --answers FILE.yaml instead")
    return line.strip() or default


def ask_answers(inp: TextIO, out: TextIO) -> dict[str, Any]:
    """The guided questions; each answer is checked at once and asked again when wrong."""
    from appliance.setup import provision

    raw: dict[str, Any] = {}
    for key, prompt, default in QUESTIONS:
        while True:
            value: Any = _ask(prompt, default, inp, out)
            if key == "cloud.target":
                value = _ask_cloud(value, inp, out)
                key_out = "cloud"
            elif key == "readers":
                value = [r.strip() for r in value.split(",") if r.strip()]
                key_out = key
            else:
                key_out = key
            try:
                provision.validate({"site_name": "x", **raw, key_out: value})
            except ProvisionError as e:
                out.write(f"  {e}\n")
                continue
            raw[key_out] = value
            break
    return raw


def _ask_cloud(target: str, inp: TextIO, out: TextIO) -> dict[str, Any]:
    cloud: dict[str, Any] = {"target": target}
    for key, prompt, default in CLOUD_QUESTIONS.get(target, []):
        cloud[key] = _ask(prompt, default, inp, out)
    if target in CLOUD_QUESTIONS:
        cloud["recipient_key"] = _ask("Cloud recipient key (age1…)", "", inp, out)
    return cloud


def _flag_answers(args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for key in ("site_name", "ae_title", "dicom_port", "web_port"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    if args.modalities is not None:
        raw["allowed_modalities"] = args.modalities
    if args.cloud_target:
        raw["cloud"] = {k: v for k, v in {
            "target": args.cloud_target, "url": args.cloud_url, "bucket": args.cloud_bucket,
            "prefix": args.cloud_prefix, "folder": args.cloud_folder,
            "recipient_key": args.recipient_key}.items() if v is not None}
    if args.site_pacs:
        raw["site_pacs"] = args.site_pacs
    if args.reader:
        raw["readers"] = args.reader
    return raw


def cmd_provision(args: argparse.Namespace) -> int:
    from appliance.core import audit, db
    from appliance.setup import provision, site

    data_dir = config.resolve_data_dir(args.data_dir)
    try:
        raw = provision.load_answers(Path(args.answers)) if args.answers else {}
    except ProvisionError as e:
        raise CliError(str(e)) from None
    raw.update(_flag_answers(args))
    if not args.answers and "site_name" not in raw:
        if not (args.guided or sys.stdin.isatty()):
            raise CliError("give --answers FILE.yaml or --site-name (or run in a terminal)")
        raw = {**ask_answers(sys.stdin, sys.stdout), **raw}
    try:
        answers = provision.validate(raw)
        text = provision.render_config(answers, data_dir)
    except ProvisionError as e:
        where = f"{args.answers}: " if args.answers else ""
        raise CliError(f"{where}{e}") from None
    result = site.init_data_dir(data_dir, answers.site_name, answers.ae_title,
                                answers.dicom_port, answers.web_port, force=args.force)
    from appliance.core import durable

    durable.atomic_write(data_dir / config.CONFIG_NAME, text.encode(), mode=0o600)
    conn = db.open_db(data_dir / "appliance.db")
    try:
        with db.transaction(conn):
            invited = provision.invite_readers(conn, answers.readers)
            audit.record(conn, "cli:provision", "site.provision", answers.site_name,
                         source="cli", detail={
                             "modalities": answers.allowed_modalities,
                             "cloud": answers.cloud["target"],
                             "site_pacs": answers.site_pacs.ae_title if answers.site_pacs else "",
                             "readers": [r.username for r in answers.readers]})
    finally:
        conn.close()
    _print_summary(answers, result, invited)
    return 0


def _print_summary(answers, result, invited) -> None:
    print(f"provisioned {result.data_dir} for {answers.site_name}")
    print(f"  DICOM   AE title {answers.ae_title}, port {answers.dicom_port}"
          f"{', modalities ' + ' '.join(answers.allowed_modalities) if answers.allowed_modalities else ''}")
    print(f"  web     https://localhost:{answers.web_port}/")
    print(f"  cloud   {answers.cloud['target']}")
    if answers.site_pacs:
        p = answers.site_pacs
        print(f"  reports to site PACS {p.ae_title} at {p.host}:{p.port}")
    for reader, password in invited:
        print(f"  reader {reader.username} ({reader.role}): one-time password {password}")
    print("  admin login: user 'admin', password (shown once, write it down):")
    print(f"    {result.admin_password}")


# -- logs ------------------------------------------------------------------------------------
def _log_files(logs_dir: Path, components: set[str] | None) -> list[Path]:
    files = sorted(p for p in logs_dir.glob("*.log") if p.is_file())
    return [p for p in files if not components or p.stem in components]


def _parse(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _matches(rec: dict[str, Any], study: str | None, level: str | None) -> bool:
    if level and rec.get("level") in LEVELS and LEVELS.index(rec["level"]) < LEVELS.index(level):
        return False
    return not study or any(study in str(v) for v in rec.values())


LEVELS = ["debug", "info", "warning", "error", "critical"]
_SHOWN = {"ts", "level", "component", "logger", "msg", "exc"}


def render_line(rec: dict[str, Any]) -> str:
    """One readable line: time, component, level, message, then key=value extras."""
    ts = str(rec.get("ts", ""))
    when = ts[:10] + " " + ts[11:19] if len(ts) >= 19 else ts
    extras = " ".join(f"{k}={v}" for k, v in rec.items() if k not in _SHOWN)
    line = f"{when} {rec.get('component', '?'):<7} {rec.get('level', ''):<7} {rec.get('msg', '')}"
    if extras:
        line += f"  [{extras}]"
    if rec.get("exc"):
        line += "\n    " + str(rec["exc"]).replace("\n", "\n    ")
    return line


def read_records(files: Iterable[Path],
                 offsets: dict[Path, int] | None = None) -> list[dict[str, Any]]:
    """Every parsable record of these files, merged in time order.

    ``offsets`` receives how many bytes of each file were read, so ``--follow``
    continues exactly where this read stopped and no line falls in between.
    """
    out = []
    for path in files:
        with open(path, "rb") as fh:
            data = fh.read()
        data = data[: data.rfind(b"\n") + 1]
        if offsets is not None:
            offsets[path] = len(data)
        text = data.decode("utf-8", errors="replace")
        out.extend(r for r in map(_parse, text.splitlines()) if r is not None)
    out.sort(key=lambda r: str(r.get("ts", "")))
    return out


def follow(files_fn, offsets: dict[Path, int], poll_s: float = 0.5) -> Iterator[dict[str, Any]]:
    """New records as they are appended (files that appear later are picked up too)."""
    while True:
        batch = []
        for path in files_fn():
            start = offsets.get(path, 0)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size < start:  # truncated or replaced
                start = 0
            if size == start:
                continue
            with open(path, "rb") as fh:
                fh.seek(start)
                chunk = fh.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            offsets[path] = start + len(complete)
            text = complete.decode("utf-8", errors="replace")
            batch.extend(r for r in map(_parse, text.splitlines()) if r is not None)
        batch.sort(key=lambda r: str(r.get("ts", "")))
        yield from batch
        if not batch:
            time.sleep(poll_s)


def cmd_logs(args: argparse.Namespace) -> int:
    cfg = config.load(args.data_dir)
    comps = set(args.component) if args.component else None
    files = _log_files(cfg.logs_dir, comps)
    if comps and not files and not args.follow:
        raise CliError(f"no logs for {', '.join(sorted(comps))} in {cfg.logs_dir}")
    offsets: dict[Path, int] = {}
    records = [r for r in read_records(files, offsets) if _matches(r, args.study, args.level)]
    for rec in records[-args.lines:] if args.lines else records:
        print(json.dumps(rec) if args.json else render_line(rec), flush=True)
    if not args.follow:
        return 0
    try:
        for rec in follow(lambda: _log_files(cfg.logs_dir, comps), offsets):
            if _matches(rec, args.study, args.level):
                print(json.dumps(rec) if args.json else render_line(rec), flush=True)
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    return 0


# -- migrate -----------------------------------------------------------------------------------
def cmd_migrate(args: argparse.Namespace) -> int:
    from appliance.core import db

    cfg = config.load(args.data_dir)
    conn = db.connect(cfg.db_path)
    try:
        before = db.schema_version(conn)
        after = db.migrate(conn, log=lambda m: print(f"  {m}"))
    finally:
        conn.close()
    print(f"database schema version {after}" + (f" (was {before})" if after != before else
                                                " (up to date)"))
    return 0


# -- registration -----------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "provision", help="set up a new site: guided questions or --answers FILE.yaml",
        description="Create a site from a handful of answers: site name, AE title, ports, "
                    "allowed modalities, cloud target and recipient key, site PACS, readers to "
                    "invite. Every answer is validated before anything is created.")
    data_dir_arg(p)
    p.add_argument("--answers", metavar="FILE.yaml", help="answers file (keys as in the README)")
    p.add_argument("--guided", action="store_true", help="ask the questions even without a tty")
    p.add_argument("--site-name")
    p.add_argument("--ae-title")
    p.add_argument("--dicom-port")
    p.add_argument("--web-port")
    p.add_argument("--modalities", metavar="CT,MR,…", help="modalities the site sends")
    p.add_argument("--cloud-target", choices=("none", "s3", "folder"))
    p.add_argument("--cloud-url")
    p.add_argument("--cloud-bucket")
    p.add_argument("--cloud-prefix")
    p.add_argument("--cloud-folder")
    p.add_argument("--recipient-key", metavar="age1…", help="the cloud's age public key")
    p.add_argument("--site-pacs", metavar="AE@HOST:PORT", help="where reports are delivered")
    p.add_argument("--reader", action="append", metavar="USER:ROLE[:NAME]",
                   help="a reader to invite (repeatable); role radiologist or neurologist")
    p.add_argument("--force", action="store_true",
                   help="re-provision a non-empty directory (the old one is kept beside it)")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("logs", help="show the JSON-lines logs readably (--follow to tail)",
                       description="Merge DATA_DIR/logs/*.log in time order and print them "
                                   "readably; filter by component, study or level.")
    data_dir_arg(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--component", action="append", metavar="NAME",
                   help="only this component (dicom, web, worker, up …); repeatable")
    p.add_argument("--study", metavar="UID", help="only lines that mention this study (or any id)")
    p.add_argument("--level", choices=LEVELS, help="only this level and above")
    p.add_argument("-n", "--lines", type=int, default=200, help="last N lines (0 = all)")
    p.add_argument("--json", action="store_true", help="print the JSON records as they are")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("migrate", help="apply pending database migrations (install.sh upgrades)")
    data_dir_arg(p)
    p.set_defaults(func=cmd_migrate)


REGISTER = [register]
