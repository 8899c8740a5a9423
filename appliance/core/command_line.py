"""What every command group shares: the error a user can fix, ``--data-dir``, the site, the actor.

``appliance/cli.py`` and each capability's ``cli.py`` import these from here, so a
capability's commands never import the top-level parser (no import cycle), and the
audit trail names a shell user one way everywhere.
"""

from __future__ import annotations

import argparse
import getpass

from appliance.core import config


class CliError(Exception):
    """A failure the user can fix: printed as one ``error: …`` line, exit status 1."""


def data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR",
                   help="the site's data directory (default: $APPLIANCE_DATA_DIR)")


def load_site(args: argparse.Namespace) -> config.Config:
    """The validated config of ``--data-dir`` (or $APPLIANCE_DATA_DIR)."""
    return config.load(args.data_dir)


def setup_logs(cfg: config.Config, component: str) -> None:
    from appliance.core import logs

    logs.setup(component, cfg.logs_dir, cfg["logging"]["level"])


def actor() -> str:
    """The audit trail's name for whoever runs a command: ``cli:<login name>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"
