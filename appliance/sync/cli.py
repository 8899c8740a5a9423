"""``appliance bundle build|verify|open``, ``appliance restore`` and ``appliance sync status|now``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from appliance.core import audit, db, identity
from appliance.core.command_line import CliError, actor, data_dir_arg, load_site
from appliance.core.config import ConfigError
from appliance.core.config import load as load_config
from appliance.sync import bundle as bnd
from appliance.sync import outbox, restore, status, upload
from appliance.sync import targets as st
from dicom_node import index as dicom_index


def cmd_build(args: argparse.Namespace) -> int:
    cfg = load_site(args)
    recipients = args.recipient or cfg["sync"]["recipients"]
    conn = db.open_db(cfg.db_path)
    try:
        rows = dicom_index.study_instances(conn, args.study_uid)
        if not rows:
            raise CliError(f"no study {args.study_uid} on this appliance")
        bnd.parse_recipients(recipients)  # a clear error before a sequence number is used
        with db.transaction(conn):
            seq = outbox.next_seq(conn, cfg["site"]["id"])
        bundle_id = bnd.new_bundle_id(cfg["site"]["id"], seq)
        entries = [bnd.Entry(f"dicom/{r['path']}", r["sha256"], r["size"],
                             source=cfg.studies_dir / r["path"],
                             meta={"sop_uid": r["sop_uid"], "type": "dicom"}) for r in rows]
        info = bnd.build(Path(args.out), bundle_id, identity.load_signing_key(cfg.keys_dir),
                         recipients, entries, bnd.PRIORITY_ROUTINE, "study", args.study_uid)
        audit.record(conn, actor(), "bundle.export", args.study_uid, source="cli",
                     detail={"bundle_id": bundle_id, "out": str(args.out),
                             "instances": len(rows), "recipients": len(recipients)})
    except bnd.BundleError as e:
        raise CliError(str(e)) from None
    finally:
        conn.close()
    print(f"built {args.out}: bundle {info.bundle_id}, {len(rows)} instances, "
          f"{info.size / 1e6:.1f} MB, signed by key {info.key_id}")
    return 0


TRUST_HELP = ("accept only bundles signed by this appliance key id (repeat for several); "
              "required: the site's key id is printed by `appliance init` and by "
              "`appliance bundle verify FILE`")
KEY_ID_CHARS = 16


def trusted_key_ids(args: argparse.Namespace) -> list[str]:
    """The ``--trust`` key ids, required: a bundle carries its own public key, so without
    them anyone who can write to the bucket could sign bundles that would be accepted."""
    if not args.trust:
        raise CliError("--trust KEY_ID is required: the signing key id of the appliance that "
                       "made the bundles (printed by `appliance init` and by `appliance bundle "
                       "verify FILE`); nothing was read")
    for k in args.trust:
        if len(k) != KEY_ID_CHARS or any(c not in "0123456789abcdef" for c in k):
            raise CliError(f"--trust {k!r}: a key id is {KEY_ID_CHARS} lowercase hex "
                           "characters (as `appliance bundle verify` prints it)")
    return list(args.trust)


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        info = bnd.verify(Path(args.file), args.trust or None)
    except bnd.BundleError as e:
        raise CliError(f"{args.file}: {e}") from None
    print(f"{args.file}: signature OK")
    print(f"  bundle {info.bundle_id}  site {info.site_id}  sequence {info.seq}")
    print(f"  signed by key {info.key_id}{'' if args.trust else ' (not checked against a trusted key: pass --trust KEY_ID)'}")
    signed = "ciphertext" if info.format == 1 else "magic and ciphertext"
    print(f"  SHA-256 of the {signed} {info.sha256}  size {info.size} bytes"
          f"  (format {info.format})")
    return 0


def _optional_site(args: argparse.Namespace):
    try:
        return load_config(args.data_dir)
    except ConfigError:
        return None


def cmd_open(args: argparse.Namespace) -> int:
    out = Path(args.out)
    ledger = bnd.FileLedger(Path(args.ledger) if args.ledger else out / ".received-bundles.json")
    trusted = trusted_key_ids(args)
    try:
        ids = bnd.load_identity(Path(args.identity))
        opened = bnd.open_bundle(Path(args.file), ids, out, ledger, trusted)
    except bnd.BundleError as e:
        raise CliError(f"{args.file}: {e}; nothing was written") from None
    cfg = _optional_site(args)
    if cfg is not None:  # opening patient data is audited where there is an audit trail
        conn = db.open_db(cfg.db_path)
        try:
            audit.record(conn, actor(), "bundle.open", opened.info.bundle_id, source="cli",
                         detail={"out": str(out), "files": len(opened.manifest["files"])})
        finally:
            conn.close()
    print(f"opened bundle {opened.info.bundle_id} ({opened.manifest['kind']} "
          f"{opened.manifest['subject']}): {len(opened.manifest['files'])} files into {out}, "
          "every SHA-256 checked")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    cfg = load_site(args)
    trusted = trusted_key_ids(args)
    try:
        ids = bnd.load_identity(Path(args.identity))
        target = st.from_url(args.from_, url=args.endpoint_url or "", region=args.region,
                             credentials_file=args.credentials_file or "")
        target.check()
        counts = restore.restore(cfg, target, ids, trusted, args.site)
    except (bnd.BundleError, st.TargetError) as e:
        raise CliError(str(e)) from None
    print(f"restored {counts['bundles']} bundles: {counts['instances']} instances, "
          f"{counts['reports']} reports, {counts.get('recordings', 0)} consult recordings, "
          f"{counts['audit_rows']} audit rows "
          f"({counts['skipped']} already restored, {counts['rejected']} rejected)")
    return 0 if not counts["rejected"] else 2


def cmd_sync_status(args: argparse.Namespace) -> int:
    cfg = load_site(args)
    conn = db.open_db(cfg.db_path)
    try:
        f = status.figures(conn)
    finally:
        conn.close()
    f["target"] = cfg["sync"]["target"]
    if args.json:
        print(json.dumps(f, indent=2))
        return 0
    last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f["last_success"])) \
        if f["last_success"] else "never"
    link = {True: "up", False: "DOWN", None: "not checked yet"}[f["link_up"]]
    print(f"target: {f['target']}   link: {link}"
          + (f" ({f['link_error']})" if f["link_error"] and not f["link_up"] else ""))
    print(f"queued bundles: {f['queued']}  {f['by_state']}")
    print(f"instances not yet bundled: {f['instances_not_bundled']}")
    print(f"bytes left: {f['bytes_left'] / 1e6:.1f} MB   last success: {last}   "
          f"oldest unsent: {f['oldest_unsent_lag_s']:.0f} s")
    if f["last_error"]:
        print(f"last error: {f['last_error']}")
    return 0


def cmd_sync_now(args: argparse.Namespace) -> int:
    cfg = load_site(args)
    if not outbox.enabled(cfg):
        raise CliError("sync is off: set sync.target and sync.recipients in appliance.yaml")
    try:
        r = upload.sync_now(cfg)
    except st.TargetError as e:
        raise CliError(str(e)) from None
    print(f"built {r['built']} bundles, confirmed {r['confirmed']}, "
          f"link {'up' if r['link_up'] else 'down'}"
          + (f": {r['link_error']}" if r["link_error"] and not r["link_up"] else ""))
    if r["conflict"]:
        print(f"{r['conflict']} bundle(s) could not be sent as they are: see appliance sync status")
    return 0 if r["link_up"] and not r["failed"] and not r["conflict"] else 3


def cmd_keygen(args: argparse.Namespace) -> int:
    """An age key pair for a recipient (cloud or escrow): secret file 0600, public key printed."""
    import os

    import pyrage

    out = Path(args.out)
    if out.exists():
        raise CliError(f"{out} exists; refusing to overwrite a key")
    ident = pyrage.x25519.Identity.generate()
    pub = str(ident.to_public())
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# age identity for appliance bundles\n# public key: {pub}\n{ident}\n")
        f.flush()
        os.fsync(f.fileno())
    print(pub)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bundle", help="build, verify or open an encrypted, signed bundle")
    bs = b.add_subparsers(dest="bundle_command", metavar="ACTION")
    bs.required = True
    p = bs.add_parser("build", help="bundle one study (hand carriage, or another recipient)")
    data_dir_arg(p)
    p.add_argument("--study-uid", required=True, help="Study Instance UID")
    p.add_argument("--out", required=True, metavar="FILE", help="bundle file to write")
    p.add_argument("--recipient", action="append", metavar="AGE_PUBKEY",
                   help="age public key to encrypt to (repeat; default: sync.recipients)")
    p.set_defaults(func=cmd_build)
    p = bs.add_parser("verify", help="check a bundle's signature and structure (no key needed)")
    data_dir_arg(p)
    p.add_argument("file")
    p.add_argument("--trust", action="append", metavar="KEY_ID",
                   help="accept only bundles signed by this appliance key id (repeat)")
    p.set_defaults(func=cmd_verify)
    p = bs.add_parser("open", help="decrypt a bundle, check every hash, write its files")
    data_dir_arg(p)
    p.add_argument("file")
    p.add_argument("--identity", required=True, metavar="KEYFILE",
                   help="age identity file (AGE-SECRET-KEY-1…)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--trust", action="append", metavar="KEY_ID", help=TRUST_HELP)
    p.add_argument("--ledger", metavar="FILE",
                   help="replay ledger (default: DIR/.received-bundles.json)")
    p.set_defaults(func=cmd_open)
    p = bs.add_parser("keygen", help="make an age key pair for a recipient (cloud, escrow)")
    p.add_argument("--out", required=True, metavar="KEYFILE",
                   help="secret key file to create (0600); the public key is printed")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("restore", help="rebuild this data directory from a site's bundles",
                       description="Download every bundle of a site from TARGET (s3://bucket/"
                       "prefix or a folder), verify, decrypt and re-index it here.")
    data_dir_arg(p)
    p.add_argument("--from", dest="from_", required=True, metavar="TARGET")
    p.add_argument("--identity", required=True, metavar="KEYFILE")
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO, Ceph, …); default AWS")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--credentials-file", help="file with access_key_id / secret_access_key")
    p.add_argument("--site", help="only this site id's bundles")
    p.add_argument("--trust", action="append", metavar="KEY_ID", help=TRUST_HELP)
    p.set_defaults(func=cmd_restore)

    s = sub.add_parser("sync", help="cloud sync: status, or sync now")
    ss = s.add_subparsers(dest="sync_command", metavar="ACTION")
    ss.required = True
    p = ss.add_parser("status", help="queued bundles, bytes left, last success, lag")
    data_dir_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sync_status)
    p = ss.add_parser("now", help="build what is due and upload now, retrying at once")
    data_dir_arg(p)
    p.set_defaults(func=cmd_sync_now)


REGISTER = [register]
