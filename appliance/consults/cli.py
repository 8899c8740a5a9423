"""``appliance media probe|record|relay-check|turn-config``: the appliance's own consult participant.

``probe`` joins a consult as a receive-only aiortc participant, prints the
join time to the first video frame, frames and frame rate as JSON, and
records the join time with the consult's other measurements.
``record`` records a consult whose consent was captured, each participant's
audio and video encrypted with age to ``sync.recipients`` under ``recordings/``.
``relay-check`` says whether the capped aiortc relay would take N more
streams on this machine (exit 1 with the reason when it would not).
``turn-config`` writes coturn's config and prints the command that runs it.
``serve`` is the media service ``appliance up`` starts (appliance/media_service.py):
recordings asked for in the consult page, scheduled probes, the capped relay.
``recover`` seals (or discards, when empty) what a killed recorder left.
"""

from __future__ import annotations

import argparse
import shlex

from appliance.consults import media, turn
from appliance.consults import rooms as consults
from appliance.core import config
from appliance.core.command_line import CliError, data_dir_arg


def cmd_probe(args: argparse.Namespace) -> int:
    cfg = config.load(args.data_dir)
    if not 1 <= args.seconds <= 3600:
        raise CliError("--seconds must be between 1 and 3600")
    try:
        result = media.probe(cfg, args.consult, args.seconds)
    except consults.ConsultError as e:
        raise CliError(str(e)) from None
    print(media.result_json(result))
    return 0 if result.frames else 3


def cmd_record(args: argparse.Namespace) -> int:
    cfg = config.load(args.data_dir)
    if not 1 <= args.seconds <= 4 * 3600:
        raise CliError("--seconds must be between 1 and 14400")
    try:
        result, files = media.record(cfg, args.consult, args.seconds)
    except (consults.ConsultError, media.MediaError) as e:
        raise CliError(str(e)) from None
    for f in files:
        print(f)
    return 0 if files else 3


def cmd_relay_check(args: argparse.Namespace) -> int:
    cfg = config.load(args.data_dir)
    try:
        media.check_relay(args.active, args.streams, cfg["consults"]["relay_max_streams"])
    except media.MediaError as e:
        raise CliError(str(e)) from None
    cap = media.relay_capacity(cfg["consults"]["relay_max_streams"])
    print(f"ok: {args.active + args.streams} of {cap} relay streams")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.core import logs
    from appliance.runtime import media_service

    cfg = config.load(args.data_dir)
    logs.setup("media", cfg.logs_dir, cfg["logging"]["level"])
    return media_service.serve(cfg)


def cmd_recover(args: argparse.Namespace) -> int:
    from appliance.runtime import media_service

    cfg = config.load(args.data_dir)
    found = media_service.MediaService(cfg).recover()
    for name in found["sealed"]:
        print(f"sealed (incomplete) {name}")
    for name in found["discarded"]:
        print(f"discarded (empty) {name}")
    return 0


def cmd_turn_config(args: argparse.Namespace) -> int:
    cfg = config.load(args.data_dir)
    try:
        argv = turn.command(cfg)
    except (FileNotFoundError, turn.TurnConfigError) as e:
        raise CliError(str(e)) from None
    print(shlex.join(argv))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p_media = sub.add_parser("media", help="consult media: the media service (recordings, probes, relay), coturn")
    s = p_media.add_subparsers(dest="media_cmd", required=True)
    p = s.add_parser("probe", help="join a consult as a receive-only probe and measure it")
    p.add_argument("--consult", type=int, required=True, help="consult number")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to stay (default 10)")
    data_dir_arg(p)
    p.set_defaults(func=cmd_probe)
    p = s.add_parser("record", help="record a consult (after consent), encrypted to sync.recipients")
    p.add_argument("--consult", type=int, required=True, help="consult number")
    p.add_argument("--seconds", type=float, default=600.0, help="how long to record")
    data_dir_arg(p)
    p.set_defaults(func=cmd_record)
    p = s.add_parser("relay-check", help="would the aiortc relay take N more streams here?")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--active", type=int, default=0, help="streams already relayed")
    data_dir_arg(p)
    p.set_defaults(func=cmd_relay_check)
    p = s.add_parser("serve", help="the media service: recordings, probes, relay (appliance up"
                     " runs it)")
    data_dir_arg(p)
    p.set_defaults(func=cmd_serve)
    p = s.add_parser("recover", help="seal what a killed recorder left (serve does this too)")
    data_dir_arg(p)
    p.set_defaults(func=cmd_recover)
    p = s.add_parser("turn-config", help="write coturn's config; print the command to run it")
    data_dir_arg(p)
    p.set_defaults(func=cmd_turn_config)


REGISTER = [register]
