"""coturn (Debian's ``turnserver``) for consult media: its config file and its command line.

The config is written into ``DATA_DIR/turn/turnserver.conf`` (0600) with the
TURN REST API shared secret in it (``use-auth-secret`` +
``static-auth-secret``), so the secret never appears on a command line where
``ps`` would show it. coturn listens on UDP and TCP on ``consults.turn_port``
and, when the site has a certificate, TLS on the port above it; it relays
through ``relay_min_port``–``relay_max_port``.

Whoever holds TURN credentials can ask coturn to send UDP to any address it
names, from inside the site. So coturn relays only to the internet: the
config denies loopback, link-local (cloud metadata at 169.254.169.254),
private, CGNAT and IPv6 local ranges and this machine's own addresses as
peers, and allows back only what ``turn.allowed_peer_ips`` lists (the LAN
the site's own browsers are on), minus this machine's addresses unless one
is listed by itself. No TCP relays (RFC 6062) at all: browsers never use
them, and they would open TCP connections to the site's servers.
"""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.consults import rooms as consults
from appliance.core import durable

BINARY = "turnserver"
REALM = "appliance"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Never a peer unless turn.allowed_peer_ips says so.
DENIED_PEERS = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.168.0.0/16", "240.0.0.0/4",
    "::1/128", "::ffff:0:0/96", "fc00::/7", "fe80::/10", "fec0::/10",
)
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class TurnConfigError(Exception):
    """coturn's config cannot be written safely; the message says why."""


def own_addresses(proc_net: Path = Path("/proc/self/net")) -> set[Address]:
    """Every address of this machine (its network namespace): IPv4 from the kernel's
    local routes, IPv6 from ``if_inet6``. Refuses when neither can be read, since a
    config without them would let a guest relay to this machine's own services."""
    found: set[Address] = set()
    readable = False
    try:
        lines = (proc_net / "fib_trie").read_text().splitlines()
        readable = True
    except OSError:
        lines = []
    for prev, line in zip(lines, lines[1:], strict=False):
        if line.strip() == "/32 host LOCAL" and "|--" in prev:
            found.add(ipaddress.ip_address(prev.split("|--", 1)[1].strip()))
    try:
        for line in (proc_net / "if_inet6").read_text().splitlines():
            found.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
        readable = True
    except OSError:
        pass
    if not readable:
        raise TurnConfigError(f"cannot list this machine's addresses ({proc_net}): coturn"
                              " would relay to them")
    return found


def _advertised(cfg: Any) -> set[Address]:
    """Addresses we are reached by that may not be on an interface (NAT, a public IP)."""
    out: set[Address] = set()
    for host in (cfg["consults"]["turn_host"], cfg["consults"]["turn_bind"],
                 urlsplit(str(cfg["web"].get("public_url") or "")).hostname or ""):
        try:
            addr = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            continue
        if not addr.is_unspecified:
            out.add(addr)
    return out


Span = tuple[int, int, int]  # (IP version, first, last) as integers


def _spans(net: Network, holes: Iterable[Address]) -> list[Span]:
    """``net`` as address spans, without the single addresses in ``holes``."""
    spans = [(net.version, int(net.network_address), int(net.broadcast_address))]
    for hole in holes:
        h = int(hole)
        spans = [piece for v, lo, hi in spans for piece in
                 (((v, lo, h - 1), (v, h + 1, hi)) if v == hole.version and lo <= h <= hi
                  else ((v, lo, hi),)) if piece[1] <= piece[2]]
    return spans


def _merge(spans: list[Span]) -> list[Span]:
    out: list[Span] = []
    for v, lo, hi in sorted(spans):
        if out and out[-1][0] == v and lo <= out[-1][2] + 1:
            out[-1] = (v, out[-1][1], max(hi, out[-1][2]))
        else:
            out.append((v, lo, hi))
    return out


def _text(span: Span) -> str:
    """coturn's range syntax: one address, or first-last."""
    v, lo, hi = span
    make = ipaddress.IPv4Address if v == 4 else ipaddress.IPv6Address
    return str(make(lo)) if lo == hi else f"{make(lo)}-{make(hi)}"


def peer_rules(allowed: Iterable[str], own: set[Address]) -> tuple[list[str], list[str], bool]:
    """(allowed-peer-ip ranges, denied-peer-ip ranges, whether to allow loopback peers).

    coturn checks allowed ranges before denied ones, so this machine's own
    addresses are cut out of every allowed network unless an entry names one
    alone (a site whose browsers both relay lists the relay address so)."""
    nets = [ipaddress.ip_network(a, strict=False) for a in allowed]
    alone = {n.network_address for n in nets if n.num_addresses == 1}
    holes = own - alone
    spans = _merge([s for n in nets for s in _spans(n, holes)])
    loopback = any(v == lo.version and a <= int(lo.broadcast_address)
                   and b >= int(lo.network_address) for v, a, b in spans for lo in LOOPBACK)
    denied = _merge([s for d in DENIED_PEERS for s in _spans(ipaddress.ip_network(d), ())]
                    + [(a.version, int(a), int(a)) for a in own])
    return [_text(s) for s in spans], [_text(s) for s in denied], loopback


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
        "no-tcp-relay",
        "no-software-attribute",
        f"pidfile={Path(cfg.data_dir) / 'turn' / 'turnserver.pid'}",
        f"log-file={Path(cfg.data_dir) / 'logs' / 'turnserver.log'}",
        "simple-log",
    ]
    if bind not in ("", "0.0.0.0", "::"):
        lines += [f"listening-ip={bind}", f"relay-ip={bind}"]
    lines += _peer_lines(cfg)
    cert, key = Path(cfg.tls_dir) / "server.crt", Path(cfg.tls_dir) / "server.key"
    if cert.exists() and key.exists():
        lines += [f"tls-listening-port={c['turn_port'] + 1}", f"cert={cert}", f"pkey={key}",
                  "no-tlsv1", "no-tlsv1_1", "no-dtls"]
    else:
        lines += ["no-tls", "no-dtls"]
    return "\n".join(lines) + "\n"


def _peer_lines(cfg: Any) -> list[str]:
    allowed, denied, loopback = peer_rules(cfg["turn"]["allowed_peer_ips"],
                                           own_addresses() | _advertised(cfg))
    lines = ["# Peers: the internet only, plus turn.allowed_peer_ips (see appliance.yaml)."]
    lines += [f"allowed-peer-ip={r}" for r in allowed]
    lines += [f"denied-peer-ip={r}" for r in denied]
    if loopback:  # only the loopback addresses allowed above; the rest stay denied
        lines.append("allow-loopback-peers")
    return lines


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
