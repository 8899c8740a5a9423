"""``appliance notify contact|verify|test|status``: contact points, a test page, the outbox.

Contact points are used only once verified: ``contact`` stores the address and sends it a
six-digit code (by that channel, at once), ``verify`` takes the code back. ``test`` sends a
message now and prints each channel's answer; ``status`` lists channels, their last success
and failure, and the outbox. Nothing printed names a patient.
"""

from __future__ import annotations

import argparse
import json
import time

from appliance.core import audit, config, db
from appliance.core.command_line import CliError, actor, data_dir_arg
from appliance.notify import channels, contacts, outbox


def _site(args: argparse.Namespace):
    cfg = config.load(args.data_dir)
    return cfg, db.open_db(cfg.db_path)


def _user_exists(conn, username: str) -> None:
    from appliance.accounts import users as accounts

    try:
        accounts.get_user(conn, username)
    except accounts.AccountError:
        raise CliError(f"no user {username!r} (appliance user list)") from None


def _send_now(conn, cfg, ids: list[int]) -> list[dict]:
    """Deliver the given rows in this process (the worker would within a sweep)."""
    try:
        available = channels.configured(cfg)
    except channels.CredentialsError as e:
        raise CliError(str(e)) from None
    outbox.deliver(conn, cfg, time.time(), available)
    return outbox.rows(conn, ids)


def cmd_contact(args: argparse.Namespace) -> int:
    cfg, conn = _site(args)
    try:
        _user_exists(conn, args.username)
        if not (args.email or args.phone):
            raise CliError("give --email ADDRESS and/or --phone +NUMBER")
        try:
            lines = outbox.set_contacts(conn, cfg, args.username,
                                        {"email": args.email, "sms": args.phone},
                                        time.time(), actor(), "cli")
        except (contacts.ContactError, channels.CredentialsError) as e:
            raise CliError(str(e)) from None
        for line in lines:
            print(line)
    finally:
        conn.close()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    _cfg, conn = _site(args)
    try:
        contacts.verify(conn, args.username, args.channel, args.code, time.time())
        audit.record(conn, actor(), "notify.contact_verified", args.username, source="cli",
                     detail={"channel": args.channel})
    except contacts.ContactError as e:
        raise CliError(str(e)) from None
    finally:
        conn.close()
    print(f"{args.username}: {args.channel} verified; notifications go there now")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    cfg, conn = _site(args)
    try:
        _user_exists(conn, args.username)
        targets = [(c, a) for c, a in contacts.verified(conn, args.username)
                   if not args.channel or c == args.channel]
        if args.channel == "webhook" or (not args.channel and cfg["notify"]["webhook_url"]):
            targets.append(("webhook", cfg["notify"]["webhook_url"]))
        targets = [(c, a) for c, a in targets if a]
        if not targets:
            raise CliError(f"{args.username} has no verified contact point"
                           f"{' for ' + args.channel if args.channel else ''}")
        ids = outbox.enqueue_direct(conn, cfg, args.username, "notify.test", "Test message",
                                    "A test from `appliance notify test`.", targets,
                                    time.time())
        result = _send_now(conn, cfg, ids)
        audit.record(conn, actor(), "notify.test", args.username, source="cli",
                     detail={"channels": [r["channel"] for r in result]})
    finally:
        conn.close()
    for r in result:
        print(f"{r['channel']:8} {r['address']}: {r['state']} ({r['answer']})")
    return 0 if all(r["state"] == "sent" for r in result) else 1


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "never"


def cmd_status(args: argparse.Namespace) -> int:
    cfg, conn = _site(args)
    try:
        st = outbox.status(conn, cfg, time.time())
    finally:
        conn.close()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    if st["problem"]:
        print(f"problem: {st['problem']}")
    for name, c in st["channels"].items():
        print(f"{name:8} {'configured' if c['configured'] else 'NOT configured'}; last success"
              f" {_when(c['last_success'])}; last failure {_when(c['last_failure'])}"
              f"{' (' + c['last_error'] + ')' if c['last_error'] else ''}")
    if not st["channels"]:
        print("no channel configured (notify: in appliance.yaml)")
    print("outbox: " + (", ".join(f"{k} {v}" for k, v in sorted(st["outbox"].items()))
                        or "empty") + f"; pages waiting for an acknowledgement: {st['open_pages']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p_n = sub.add_parser("notify", help="notifications by email, SMS, webhook: contacts, test,"
                                        " status")
    s = p_n.add_subparsers(dest="notify_command", metavar="ACTION")
    s.required = True
    p = s.add_parser("contact", help="set a user's email and/or phone; a code is sent there")
    data_dir_arg(p)
    p.add_argument("username")
    p.add_argument("--email", help="email address")
    p.add_argument("--phone", help="mobile number in international form (+2547…)")
    p.set_defaults(func=cmd_contact)
    p = s.add_parser("verify", help="confirm a contact point with the code it received")
    data_dir_arg(p)
    p.add_argument("username")
    p.add_argument("--channel", required=True, choices=contacts.CHANNELS)
    p.add_argument("code")
    p.set_defaults(func=cmd_verify)
    p = s.add_parser("test", help="send a test message to a user now, print each answer")
    data_dir_arg(p)
    p.add_argument("--user", dest="username", required=True)
    p.add_argument("--channel", choices=(*contacts.CHANNELS, "webhook"),
                   help="only this channel (default: every verified one, and the webhook)")
    p.set_defaults(func=cmd_test)
    p = s.add_parser("status", help="channels, last success and failure, the outbox")
    data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)


REGISTER = [register]
