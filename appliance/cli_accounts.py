"""``appliance user …`` and ``appliance token …``: accounts and API tokens from the shell.

A password never appears on a command line (``ps`` and shell history would
keep it): it is read from stdin with ``--password-stdin`` or generated and
printed once. ``token create`` prints the token alone on stdout so a script
can capture it: ``TOKEN=$(appliance token create --user pacs-bridge)``.
Every change is audited as ``cli:<login name>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from appliance import accounts, audit, config, db, tokens
from appliance.cli import CliError


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR",
                   help="the site's data directory (default: $APPLIANCE_DATA_DIR)")


@contextmanager
def _site_db(args: argparse.Namespace) -> Iterator[sqlite3.Connection]:
    cfg = config.load(args.data_dir)
    conn = db.open_db(cfg.db_path)
    try:
        yield conn
    finally:
        conn.close()


def actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


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
    if args.role is None and args.tags is None and args.display_name is None:
        raise CliError("nothing to change: give --role, --tags or --display-name")
    with _site_db(args) as conn, db.transaction(conn):
        changes = accounts.modify_user(conn, args.username, role=args.role, tags=args.tags,
                                       display_name=args.display_name)
        if changes:
            audit.record(conn, actor(), "user.modify", args.username, source="cli",
                         detail=changes)
    if not changes:
        print(f"{args.username}: nothing changed")
    for column, (old, new) in changes.items():
        print(f"{args.username}: {column} {old!r} → {new!r}")
    return 0


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
    user = sub.add_parser("user", help="manage user accounts (add, list, modify, disable, enable, reset-password)")
    us = user.add_subparsers(dest="user_command", metavar="ACTION")
    us.required = True
    pw_help = "read the password from the first line of stdin (else one is generated and printed)"

    p = us.add_parser("add", help="add a user")
    _data_dir_arg(p)
    p.add_argument("username")
    p.add_argument("--role", required=True, choices=accounts.ROLES)
    p.add_argument("--display-name", help="name shown on pages and signed reports")
    p.add_argument("--tags", help="comma-separated pools/sites, e.g. 'neuro,site:north'")
    p.add_argument("--password-stdin", action="store_true", help=pw_help)
    p.add_argument("--must-change", action="store_true",
                   help="make them change a stdin password at first sign-in")
    p.set_defaults(func=cmd_user_add)

    p = us.add_parser("list", help="list users")
    _data_dir_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_user_list)

    for name, disabled, text in (("disable", True, "disable a user (ends their sessions)"),
                                 ("enable", False, "re-enable a disabled user")):
        p = us.add_parser(name, help=text)
        _data_dir_arg(p)
        p.add_argument("username")
        p.set_defaults(func=_set_disabled(disabled))

    p = us.add_parser("modify", help="change a user's role, pools/sites (tags) or display name")
    _data_dir_arg(p)
    p.add_argument("username")
    p.add_argument("--role", choices=accounts.ROLES)
    p.add_argument("--tags", help="replaces the tags, e.g. 'neuro,site:north' ('' clears them)")
    p.add_argument("--display-name")
    p.set_defaults(func=cmd_user_modify)

    p = us.add_parser("reset-password", help="set a new password (also lifts a lockout)")
    _data_dir_arg(p)
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
    _data_dir_arg(p)
    p.add_argument("--user", required=True, help="the account the token acts as")
    p.add_argument("--expires", help="lifetime, e.g. 30d, 12h (default: never)")
    p.add_argument("--label", help="what it is for, e.g. 'PACS bridge'")
    p.set_defaults(func=_wrap(cmd_token_create))
    p = ts.add_parser("list", help="list tokens (never their secrets)")
    _data_dir_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token_list)
    p = ts.add_parser("revoke", help="revoke a token by id (see token list)")
    _data_dir_arg(p)
    p.add_argument("id", type=int)
    p.set_defaults(func=_wrap(cmd_token_revoke))


REGISTER = [register_user, register_token]
