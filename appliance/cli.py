"""``appliance``: the command line. Every command has --help; every failure is one line.

Commands are small functions that take parsed arguments and return an exit
code.  Errors the user can fix raise :class:`CliError` (or a domain error)
and become ``error: …`` on stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from appliance.core import config
from appliance.core.command_line import CliError, actor, data_dir_arg, load_site, setup_logs

Handler = Callable[[argparse.Namespace], int]






# -- init -------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from appliance.setup import site

    data_dir = config.resolve_data_dir(args.data_dir)
    result = site.init_data_dir(
        data_dir, site_name=args.site_name, ae_title=args.ae_title,
        dicom_port=args.dicom_port, web_port=args.web_port, force=args.force,
    )
    if result.replaced:
        print(f"previous data directory kept at {result.replaced}")
    print(f"initialised {result.data_dir}")
    print(f"  DICOM   AE title {args.ae_title}, port {args.dicom_port}")
    print(f"  web     https://localhost:{args.web_port}/  (CA certificate: "
          f"{result.data_dir / 'tls' / 'ca.crt'})")
    print(f"  signing key id {result.key_id}")
    print("  admin login: user 'admin', password (shown once, write it down):")
    print(f"    {result.admin_password}")
    return 0


# -- processes ----------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from appliance.runtime.supervisor import Supervisor

    cfg = load_site(args)
    setup_logs(cfg, "up")
    d, w = cfg["dicom"], cfg["web"]
    print(f"DICOM  AE title {d['ae_title']}  port {d['port']}  (bind {d['bind']})", flush=True)
    print(f"web    https://localhost:{w['port']}/   health: https://localhost:{w['port']}/readyz",
          flush=True)
    print("Ctrl-C stops everything.", flush=True)
    return Supervisor(cfg).run()


def cmd_dicom(args: argparse.Namespace) -> int:
    from appliance.runtime import dicom_service

    cfg = load_site(args)
    setup_logs(cfg, "dicom")
    return dicom_service.run(cfg)


def cmd_web(args: argparse.Namespace) -> int:
    from appliance.runtime import web_service

    cfg = load_site(args)
    setup_logs(cfg, "web")
    return web_service.run(cfg)


def cmd_worker(args: argparse.Namespace) -> int:
    from appliance.runtime import worker

    cfg = load_site(args)
    setup_logs(cfg, "worker")
    return worker.run(cfg)


# -- status ---------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from appliance.health import status

    cfg = load_site(args)
    report = status.collect(cfg)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(status.render(report))
    return 0 if report["healthy"] else 3


# -- known AEs -------------------------------------------------------------------------
def cmd_ae_add(args: argparse.Namespace) -> int:
    cfg = load_site(args)
    name = args.name.strip()
    msg = config._ae(name)
    if msg:
        raise CliError(f"AE title {name!r} {msg}")
    if cfg.known_ae(name) and not args.replace:
        raise CliError(f"AE {name!r} is already known (use --replace to change it)")
    entry = {"name": name, "host": args.host or "", "port": args.port, "query": args.query,
             "move_destination": args.move_destination}
    if args.commitment:
        entry["commitment"] = True  # forwarding asks it for Storage Commitment
    if args.worklist:
        entry["worklist"] = True
    if args.description:
        entry["description"] = args.description
    if args.orthanc_url:
        msg = config._api_url(args.orthanc_url.strip())
        if msg:  # the value is not repeated: it may carry a password
            raise CliError(f"--orthanc-url {msg}")
        entry["orthanc_url"] = args.orthanc_url.strip()  # old copies of corrected images removed
    if args.dicomweb_url is not None:
        url = args.dicomweb_url.strip().rstrip("/")
        msg = config._dicomweb_url(url) or (None if url else "must not be empty")
        if msg:  # the value is not repeated: it may carry a password
            raise CliError(f"--dicomweb-url {msg}")
        entry["dicomweb_url"] = url  # the hand-back asks it by QIDO-RS what the PACS holds

    def change(items) -> None:
        for i in reversed(range(len(items))):
            if str(items[i].get("name", "")).strip() == name:
                del items[i]
        from ruamel.yaml.comments import CommentedMap

        items.append(CommentedMap(entry))

    config.edit_known_aes(cfg.data_dir, change)
    _audit_config(cfg, "ae.add", name, entry)
    if args.query and not entry["host"]:
        print(f"warning: {name} may query without --host: anyone on the network can claim "
              f"that AE title. With dicom.require_host_for_query (the default) it is answered "
              f"only from this machine; add --host to allow its workstation.", file=sys.stderr)
    print(f"added {name} ({entry['host'] or 'any host'}:{entry['port']}"
          f"{', query' if args.query else ''}{', move destination' if args.move_destination else ''}"
          f"{', worklist' if args.worklist else ''}"
          f"{', Orthanc REST API' if args.orthanc_url else ''}"
          f"{', DICOMweb ' + entry['dicomweb_url'] if entry.get('dicomweb_url') else ''})")
    return 0


def cmd_ae_remove(args: argparse.Namespace) -> int:
    cfg = load_site(args)
    name = args.name.strip()
    if not cfg.known_ae(name):
        raise CliError(f"no known AE named {name!r}")

    def change(items) -> None:
        for i in reversed(range(len(items))):
            if str(items[i].get("name", "")).strip() == name:
                del items[i]

    config.edit_known_aes(cfg.data_dir, change)
    _audit_config(cfg, "ae.remove", name, {})
    print(f"removed {name}")
    return 0


def cmd_ae_list(args: argparse.Namespace) -> int:
    cfg = load_site(args)
    aes = cfg.known_aes
    if args.json:
        print(json.dumps([ae.__dict__ for ae in aes], indent=2))
        return 0
    if not aes:
        print("no known AEs (any AE may C-ECHO/C-STORE unless dicom.store_from is 'known')")
        return 0
    print(f"{'AE title':<17}{'host':<24}{'port':>6}  query  move-destination  DICOMweb")
    for ae in aes:
        print(f"{ae.name:<17}{ae.host or '(any)':<24}{ae.port:>6}  {'yes' if ae.query else 'no':<5}  "
              f"{'yes' if ae.move_destination else 'no':<16}  {ae.dicomweb_url or '-'}")
    return 0


def _audit_config(cfg: config.Config, action: str, obj: str, detail: dict) -> None:

    from appliance.core import audit, db

    conn = db.open_db(cfg.db_path)
    try:
        audit.record(conn, actor(), action, obj, source="cli", detail=detail)
    finally:
        conn.close()


# -- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Field teleradiology appliance: receive DICOM, queue reads, serve readers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("init", help="create a new site's data directory",
                       description="Create the data directory: config, database, keys, TLS "
                                   "certificate and an admin account (password printed once).")
    data_dir_arg(p)
    p.add_argument("--site-name", default="Field site", help="site name shown to users")
    p.add_argument("--ae-title", default="FIELDAPP", help="this appliance's DICOM AE title")
    p.add_argument("--dicom-port", type=int, default=11112, help="DICOM port (default 11112)")
    p.add_argument("--web-port", type=int, default=8443, help="HTTPS port (default 8443)")
    p.add_argument("--force", action="store_true",
                   help="re-initialise a non-empty directory (the old one is kept beside it)")
    p.set_defaults(func=cmd_init)

    for name, func, text in (
        ("up", cmd_up, "run every component in the foreground (Ctrl-C stops all)"),
        ("dicom", cmd_dicom, "run the DICOM node (C-ECHO/STORE/FIND/MOVE/GET)"),
        ("web", cmd_web, "run the web app (gunicorn, HTTPS)"),
        ("worker", cmd_worker, "run the background worker (huey consumer and sweeps)"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        data_dir_arg(p)
        p.set_defaults(func=func)

    p = sub.add_parser("status", help="components up or down, studies stored, free disk")
    data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    ae = sub.add_parser("ae", help="manage known remote AEs (scanners, PACS, workstations)")
    ae_sub = ae.add_subparsers(dest="ae_command", metavar="ACTION")
    ae_sub.required = True
    p = ae_sub.add_parser("add", help="add (or --replace) a known AE")
    data_dir_arg(p)
    p.add_argument("name", help="the remote AE title")
    p.add_argument("--host", help="its address (when given, associations must come from it)")
    p.add_argument("--port", type=int, default=104, help="its DICOM port (for C-MOVE)")
    p.add_argument("--query", action="store_true", help="allow it C-FIND, C-MOVE and C-GET")
    p.add_argument("--move-destination", action="store_true",
                   help="allow C-MOVE to send to it")
    p.add_argument("--commitment", action="store_true",
                   help="a PACS that answers Storage Commitment: forwarded instances count as"
                        " delivered only once it commits them")
    p.add_argument("--worklist", action="store_true",
                   help="allow it the Modality Worklist (C-FIND) and MPPS (a scanner)")
    p.add_argument("--description", help="free text, e.g. 'CT scanner, room 2'")
    p.add_argument("--orthanc-url", metavar="URL",
                   help="its Orthanc REST API (http://host:8042): after a reconciliation the"
                        " copies under the old Patient ID are deleted there once the corrected"
                        " ones are delivered (user and password: patients.pacs_credentials_file)")
    p.add_argument("--dicomweb-url", metavar="URL",
                   help="a PACS's DICOMweb root (http:// or https://): the hand-back asks it"
                        " by QIDO-RS what the PACS holds, instead of C-FIND")
    p.add_argument("--replace", action="store_true", help="replace an existing entry")
    p.set_defaults(func=cmd_ae_add)
    p = ae_sub.add_parser("list", help="list known AEs")
    data_dir_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ae_list)
    p = ae_sub.add_parser("remove", help="remove a known AE")
    data_dir_arg(p)
    p.add_argument("name")
    p.set_defaults(func=cmd_ae_remove)

    for register in _EXTENSIONS:
        register(sub)
    return parser


# Other modules add their command groups here (workflow, user, audit, bundle …).
_EXTENSIONS: list[Callable[[argparse._SubParsersAction], None]] = []


# Each holds ``REGISTER = [fn(subparsers)]``, registered by name: a missing module fails at start.
EXTENSION_MODULES = (
    "appliance.reading.cli",  # workflow
    "appliance.accounts.cli",  # user, token, audit
    "appliance.sync.cli",  # bundle, restore, sync
    "appliance.setup.cli",  # provision, logs, migrate
    "appliance.reports.cli",  # reports
    "appliance.consults.cli",  # media
    "appliance.forwarding.cli",  # forward, forward status
    "appliance.notify.cli",  # notify contact, verify, test, status
    "appliance.patients.cli",  # patient
)


def _load_extensions() -> None:
    """Every capability's command registrars, once: a second call (main() run twice in one
    process, as tests do) replaces the list rather than registering each group twice."""
    import importlib

    loaded = [r for module in EXTENSION_MODULES for r in importlib.import_module(module).REGISTER]
    _EXTENSIONS[:] = loaded


def main(argv: list[str] | None = None) -> int:
    _load_extensions()
    parser = build_parser()
    args = parser.parse_args(argv)
    from appliance.accounts.users import AccountError
    from appliance.setup.site import InitError

    try:
        return args.func(args)
    except (CliError, config.ConfigError, InitError, AccountError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
