"""``appliance user …`` and ``appliance token …``: accounts and API tokens from the shell.

A password never appears on a command line (``ps`` and shell history would
keep it): it is read from stdin with ``--password-stdin`` or generated and
printed once. ``token create`` prints the token alone on stdout so a script
can capture it: ``TOKEN=$(appliance token create --user pacs-bridge)``.
Every change is audited as ``cli:<login name>``.

``appliance audit verify`` and ``appliance audit export``: the privacy officer's tools.

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
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from appliance.accounts import tokens
from appliance.accounts import users as accounts
from appliance.core import audit, audit_heads, config, db, durable, identity
from appliance.core.command_line import CliError, actor, data_dir_arg


@contextmanager
def _site_db(args: argparse.Namespace) -> Iterator[sqlite3.Connection]:
    cfg = config.load(args.data_dir)
    conn = db.open_db(cfg.db_path)
    try:
        yield conn
    finally:
        conn.close()



def _read_password(args: argparse.Namespace) -> tuple[str, bool]:
    """(password, generated?) from stdin's first line, or a fresh one to print once."""
    if args.password_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise CliError("no password on stdin")
        return line, False
    return accounts.generate_password(), True


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M")


# -- user ------------------------------------------------------------------------------------
def cmd_user_add(args: argparse.Namespace) -> int:
    password, generated = _read_password(args)
    with _site_db(args) as conn, db.transaction(conn):
        accounts.add_user(conn, args.username, args.role, password,
                          display_name=args.display_name or "", tags=args.tags or "",
                          must_change=generated or args.must_change)
        audit.record(conn, actor(), "user.add", args.username, source="cli",
                     detail={"role": args.role, "tags": args.tags or ""})
    print(f"added {args.username} ({args.role})")
    if generated:
        print("password (shown once; they must change it at first sign-in):")
        print(f"  {password}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    with _site_db(args) as conn:
        users = accounts.list_users(conn)
    if args.json:
        print(json.dumps(users, indent=2))
        return 0
    print(f"{'user':<18}{'role':<13}{'state':<10}{'totp':<6}{'last sign-in':<18}tags")
    for u in users:
        state = "disabled" if u["disabled"] else ("new-pw" if u["must_change_password"] else "active")
        print(f"{u['username']:<18}{u['role']:<13}{state:<10}"
              f"{'yes' if u['totp_enrolled'] else 'no':<6}{_when(u['last_login_at']):<18}{u['tags']}")
    return 0


def _set_disabled(disabled: bool) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        with _site_db(args) as conn, db.transaction(conn):
            accounts.set_disabled(conn, args.username, disabled)
            audit.record(conn, actor(), "user.disable" if disabled else "user.enable",
                         args.username, source="cli")
        print(f"{'disabled' if disabled else 'enabled'} {args.username}")
        return 0

    return run


def cmd_user_modify(args: argparse.Namespace) -> int:
    contact = {"email": args.email, "sms": args.phone}
    if args.role is None and args.tags is None and args.display_name is None \
            and not any(contact.values()):
        raise CliError("nothing to change: give --role, --tags, --display-name, --email or"
                       " --phone")
    cfg = config.load(args.data_dir)
    with _site_db(args) as conn:
        accounts.get_user(conn, args.username)  # AccountError: no such user, nothing changed
        _check_contacts(cfg, contact)
        lines: list[str] = []
        with db.transaction(conn):
            changes = accounts.modify_user(conn, args.username, role=args.role,
                                           tags=args.tags, display_name=args.display_name)
            if changes:
                audit.record(conn, actor(), "user.modify", args.username, source="cli",
                             detail=changes)
        if any(contact.values()):
            lines = _send_codes(cfg, conn, args.username, contact)
    if not changes and not lines:
        print(f"{args.username}: nothing changed")
    for column, (old, new) in changes.items():
        print(f"{args.username}: {column} {old!r} → {new!r}")
    for line in lines:  # each contact point is used once its code comes back
        print(f"{args.username}: {line}; then: appliance notify verify {args.username}"
              " --channel email|sms CODE")
    return 0


def _check_contacts(cfg: config.Config, contact: dict[str, str | None]) -> None:
    """Bad addresses or an unsafe credentials file fail before anything changes."""
    from appliance.notify import channels, contacts  # notify delivers; accounts only asks

    try:
        for channel, address in contact.items():
            if address:
                contacts.check_address(channel, address)
        if any(contact.values()):
            channels.configured(cfg)
    except (contacts.ContactError, channels.CredentialsError) as e:
        raise CliError(str(e)) from None


def _send_codes(cfg: config.Config, conn: sqlite3.Connection, username: str,
                contact: dict[str, str | None]) -> list[str]:
    from appliance.notify import outbox as notify_outbox

    return notify_outbox.set_contacts(conn, cfg, username, contact, time.time(), actor(),
                                      "cli")


def cmd_user_reset_password(args: argparse.Namespace) -> int:
    password, generated = _read_password(args)
    with _site_db(args) as conn, db.transaction(conn):
        accounts.reset_password(conn, args.username, password, must_change=True,
                                reset_totp=args.reset_totp)
        audit.record(conn, actor(), "user.reset_password", args.username, source="cli",
                     detail={"reset_totp": args.reset_totp})
    print(f"password of {args.username} reset; their sessions ended; they choose a new one "
          "at next sign-in")
    if generated:
        print(f"  {password}")
    return 0


def cmd_user_unlock(args: argparse.Namespace) -> int:
    """Lift a lockout now (the real user is locked out by someone else's guessing)."""
    cfg = config.load(args.data_dir)
    conn = db.open_db(cfg.db_path)
    try:
        with db.transaction(conn):
            held = accounts.sign_in_blocks(conn, args.username, time.time(), cfg["auth"])
            accounts.unlock(conn, args.username, "cli")
            audit.record(conn, actor(), "user.unlock", args.username, source="cli", detail=held)
    finally:
        conn.close()
    print(f"unlocked {args.username}: {_held_text(held)}")
    return 0


def _held_text(held: dict) -> str:
    parts = [f"lifted the lockout for {', '.join(held['locked'])}"] if held["locked"] else []
    parts += ["refilled the spent attempt budget"] if held["budget_spent"] else []
    return "; ".join(parts) or "nothing was holding it back"


# -- token -------------------------------------------------------------------------------------
def cmd_token_create(args: argparse.Namespace) -> int:
    expires = tokens.parse_duration(args.expires) if args.expires else None
    with _site_db(args) as conn, db.transaction(conn):
        secret = tokens.create_token(conn, args.user, expires_in_s=expires, label=args.label or "")
        token_id = conn.execute("SELECT max(id) FROM api_tokens").fetchone()[0]
        audit.record(conn, actor(), "token.create", args.user, source="cli",
                     detail={"token_id": token_id, "expires_in_s": expires,
                             "label": args.label or ""})
    print(secret)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    with _site_db(args) as conn:
        rows = tokens.list_tokens(conn)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'id':>4}  {'user':<16}{'prefix':<12}{'created':<18}{'expires':<18}{'state':<9}label")
    for t in rows:
        state = "revoked" if t["revoked_at"] else "live"
        print(f"{t['id']:>4}  {t['username']:<16}{t['prefix'] + '…':<12}{_when(t['created_at']):<18}"
              f"{_when(t['expires_at']) if t['expires_at'] else 'never':<18}{state:<9}{t['label']}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    with _site_db(args) as conn, db.transaction(conn):
        if not tokens.revoke(conn, args.id):
            raise CliError(f"no live token with id {args.id}")
        audit.record(conn, actor(), "token.revoke", str(args.id), source="cli")
    print(f"revoked token {args.id}")
    return 0


def _wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the domain's TokenError into the CLI's one-line error."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except tokens.TokenError as e:
            raise CliError(str(e)) from None

    return run


# -- parser -------------------------------------------------------------------------------------
def register_user(sub: argparse._SubParsersAction) -> None:
    user = sub.add_parser("user", help="manage user accounts (add, list, modify, disable, enable, unlock, reset-password)")
    us = user.add_subparsers(dest="user_command", metavar="ACTION")
    us.required = True
    pw_help = "read the password from the first line of stdin (else one is generated and printed)"

    p = us.add_parser("add", help="add a user")
    data_dir_arg(p)
    p.add_argument("username")
    p.add_argument("--role", required=True, choices=accounts.ROLES)
    p.add_argument("--display-name", help="name shown on pages and signed reports")
    p.add_argument("--tags", help="comma-separated pools/sites, e.g. 'neuro,site:north'")
    p.add_argument("--password-stdin", action="store_true", help=pw_help)
    p.add_argument("--must-change", action="store_true",
                   help="make them change a stdin password at first sign-in")
    p.set_defaults(func=cmd_user_add)

    p = us.add_parser("list", help="list users")
    data_dir_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_user_list)

    for name, disabled, text in (("disable", True, "disable a user (ends their sessions)"),
                                 ("enable", False, "re-enable a disabled user")):
        p = us.add_parser(name, help=text)
        data_dir_arg(p)
        p.add_argument("username")
        p.set_defaults(func=_set_disabled(disabled))

    p = us.add_parser("modify", help="change a user's role, pools/sites (tags), display name, email or phone")
    data_dir_arg(p)
    p.add_argument("username")
    p.add_argument("--role", choices=accounts.ROLES)
    p.add_argument("--tags", help="replaces the tags, e.g. 'neuro,site:north' ('' clears them)")
    p.add_argument("--display-name")
    p.add_argument("--email", help="where notifications are mailed; a code is sent there to"
                                   " verify it (appliance notify verify)")
    p.add_argument("--phone", help="mobile number in international form (+2547…) for SMS;"
                                   " verified the same way")
    p.set_defaults(func=cmd_user_modify)

    p = us.add_parser("unlock", help="lift a sign-in lockout and the account's attempt limit")
    data_dir_arg(p)
    p.add_argument("username")
    p.set_defaults(func=cmd_user_unlock)

    p = us.add_parser("reset-password", help="set a new password (also lifts a lockout)")
    data_dir_arg(p)
    p.add_argument("username")
    p.add_argument("--password-stdin", action="store_true", help=pw_help)
    p.add_argument("--reset-totp", action="store_true",
                   help="also forget their authenticator (they enrol again at next sign-in)")
    p.set_defaults(func=cmd_user_reset_password)


def register_token(sub: argparse._SubParsersAction) -> None:
    token = sub.add_parser("token", help="API tokens for scripts and DICOMweb clients")
    ts = token.add_subparsers(dest="token_command", metavar="ACTION")
    ts.required = True
    p = ts.add_parser("create", help="create a token; prints it alone on stdout, once")
    data_dir_arg(p)
    p.add_argument("--user", required=True, help="the account the token acts as")
    p.add_argument("--expires", help="lifetime, e.g. 30d, 12h (default: never)")
    p.add_argument("--label", help="what it is for, e.g. 'PACS bridge'")
    p.set_defaults(func=_wrap(cmd_token_create))
    p = ts.add_parser("list", help="list tokens (never their secrets)")
    data_dir_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token_list)
    p = ts.add_parser("revoke", help="revoke a token by id (see token list)")
    data_dir_arg(p)
    p.add_argument("id", type=int)
    p.set_defaults(func=_wrap(cmd_token_revoke))


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


def _shipped(args: argparse.Namespace, cfg: config.Config) -> list[dict]:
    """The signed heads the site's audit slices carried to ``--against``."""
    from pathlib import Path

    from appliance.sync import bundle as bnd
    from appliance.sync import shipped_heads
    from appliance.sync import targets as st

    if not args.identity:
        raise CliError("--against needs --identity KEYFILE (the age key the bundles are "
                       "encrypted to)")
    kid = identity.key_id(identity.load_signing_key(cfg.keys_dir).public_key())
    try:
        target = st.from_url(args.against, url=args.endpoint_url or "", region=args.region,
                             credentials_file=args.credentials_file or "")
        return shipped_heads.shipped_heads(target, bnd.load_identity(Path(args.identity)),
                                           [kid], cfg["site"]["id"])
    except (bnd.BundleError, st.TargetError) as e:
        raise CliError(f"--against {args.against}: {e}") from None


def cmd_verify(args: argparse.Namespace) -> int:
    """Walk the chain, then compare it with the newest head signed outside the database
    (a truncated tail or a recomputed chain passes the walk but not this)."""
    cfg = config.load(args.data_dir)
    conn = db.connect(cfg.db_path, readonly=True)
    try:
        ok, message, _n = audit.verify(conn)
        head = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        if ok:
            pub = identity.load_signing_key(cfg.keys_dir).public_key()
            ok, anchored = audit_heads.check_chain(
                conn, audit_heads.read_heads(audit_heads.heads_path(cfg.data_dir)), pub)
            message = f"{message}; {anchored}" if ok else anchored
        if ok and args.against:
            ok, shipped = audit_heads.check_chain(conn, _shipped(args, cfg), pub)
            message = f"{message}; off the box: {shipped}" if ok else f"off the box: {shipped}"
    finally:
        conn.close()
    if ok:
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


def register_audit(sub: argparse._SubParsersAction) -> None:
    p_audit = sub.add_parser("audit", help="verify or export the hash-chained audit trail")
    s = p_audit.add_subparsers(dest="audit_command", metavar="ACTION")
    s.required = True
    p = s.add_parser("verify", help="check every link; name the first broken row")
    data_dir_arg(p)
    p.add_argument("--against", metavar="TARGET",
                   help="also check against the signed heads shipped to s3://BUCKET/PREFIX "
                        "or FOLDER (needs --identity)")
    p.add_argument("--identity", metavar="KEYFILE", help="age identity the bundles are for")
    p.add_argument("--endpoint-url", help="S3 endpoint for --against; default AWS")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--credentials-file", help="file with access_key_id / secret_access_key")
    p.set_defaults(func=cmd_verify)
    p = s.add_parser("export", help="write audit rows as JSON lines")
    data_dir_arg(p)
    p.add_argument("--since", required=True,
                   help="from when: 2026-11-28, 2026-11-28T14:00 (UTC), 24h, 7d or epoch seconds")
    p.add_argument("--out", metavar="FILE", help="write here (0600) instead of stdout")
    p.set_defaults(func=cmd_export)


REGISTER = [register_user, register_token, register_audit]
