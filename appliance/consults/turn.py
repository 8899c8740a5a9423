"""coturn (Debian's ``turnserver``) for consult media: its config file and its command line.

The config is written into ``DATA_DIR/turn/turnserver.conf`` (0600) with the
TURN REST API shared secret in it (``use-auth-secret`` +
``static-auth-secret``), so the secret never appears on a command line where
``ps`` would show it. coturn listens on UDP and TCP on ``consults.turn_port``
and, when the site has a certificate, TLS on the port above it; it relays
through ``relay_min_port``–``relay_max_port``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from appliance.consults import rooms as consults
from appliance.core import durable

BINARY = "turnserver"
REALM = "appliance"


def config_path(cfg: Any) -> Path:
    return Path(cfg.data_dir) / "turn" / "turnserver.conf"


def render(cfg: Any) -> str:
    """The coturn config for this site (contains the shared secret: keep it 0600)."""
    c = cfg["consults"]
    bind = c["turn_bind"]
    lines = [
        "# Written by `appliance turn config`; edit appliance.yaml (consults:) instead.",
        f"listening-port={c['turn_port']}",
        f"min-port={c['relay_min_port']}",
        f"max-port={c['relay_max_port']}",
        "use-auth-secret",
        f"static-auth-secret={consults.turn_secret(cfg.keys_dir)}",
        f"realm={REALM}",
        "fingerprint",
        "no-cli",
        "no-multicast-peers",
        "no-software-attribute",
        f"pidfile={Path(cfg.data_dir) / 'turn' / 'turnserver.pid'}",
        f"log-file={Path(cfg.data_dir) / 'logs' / 'turnserver.log'}",
        "simple-log",
    ]
    if bind not in ("", "0.0.0.0", "::"):
        lines += [f"listening-ip={bind}", f"relay-ip={bind}"]
    if bind.startswith("127."):
        # A loopback-only appliance (tests, a single laptop) relays to loopback peers.
        lines.append("allow-loopback-peers")
    cert, key = Path(cfg.tls_dir) / "server.crt", Path(cfg.tls_dir) / "server.key"
    if cert.exists() and key.exists():
        lines += [f"tls-listening-port={c['turn_port'] + 1}", f"cert={cert}", f"pkey={key}",
                  "no-tlsv1", "no-tlsv1_1", "no-dtls"]
    else:
        lines += ["no-tls", "no-dtls"]
    return "\n".join(lines) + "\n"


def write_config(cfg: Any) -> Path:
    """Write (or refresh) the coturn config atomically, 0600."""
    path = config_path(cfg)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    durable.atomic_write(path, render(cfg).encode("utf-8"), mode=0o600)
    return path


def binary() -> str | None:
    """Path of Debian's turnserver, or None when coturn is not installed."""
    return shutil.which(BINARY) or (f"/usr/bin/{BINARY}" if Path(f"/usr/bin/{BINARY}").exists()
                                    else None)


def command(cfg: Any) -> list[str]:
    """The argv that runs coturn in the foreground with this site's config (no secret in it)."""
    exe = binary()
    if exe is None:
        raise FileNotFoundError("coturn is not installed (apt-get install coturn)")
    return [exe, "-c", str(write_config(cfg)), "--no-stdout-log"]
