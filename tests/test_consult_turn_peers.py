"""TURN must be no way into the hospital network: the real coturn, configured by the appliance,
refuses a relay permission to loopback, private, link-local (cloud metadata) and CGNAT
addresses and to the appliance's own addresses, and grants one to what the site lists.

The attacker holds what a guest's browser gets: REST-style TURN credentials minted by the
appliance. A small TURN client (tests/turn_client.py) allocates a relay and asks for
permissions; it never sends data toward any peer. Private addresses are tried only inside a
network namespace made here, whose coturn has no route anywhere else.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import time

import pytest
from conftest import appliance_cmd, free_port, make_site, missing, require_tool
from test_auth import make_auth_app
from turn_client import TCP, TurnClient, TurnError

from appliance.consults import rooms as consults
from appliance.consults import turn
from appliance.core import config


def wait_stun(host: str, port: int, timeout: float = 10.0) -> None:
    """coturn is up when it answers a STUN binding request."""
    deadline = time.monotonic() + timeout
    req = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            s.sendto(req, (host, port))
            try:
                if s.recv(2048)[:2] == b"\x01\x01":
                    return
            except OSError:
                pass
    raise TimeoutError(f"coturn did not answer STUN on {host}:{port}")


def refused(client: TurnClient, peer: str) -> int:
    """The error code coturn answers CreatePermission(peer) with (0: granted)."""
    try:
        client.create_permission(peer)
    except TurnError as e:
        return e.code
    return 0


def credentials(cfg, consult_id: int = 1) -> tuple[str, str]:
    return consults.turn_credentials(consults.turn_secret(cfg.keys_dir), consult_id, 600)


def test_guest_credentials_cannot_relay_to_the_appliances_loopback_or_open_tcp(tmp_path):
    """Attack: with a guest's TURN credentials, relay to 127.0.0.1 (the appliance's web,
    DICOM and TURN ports) or open a TCP relay; only the loopback address the site listed works."""
    exe = require_tool("turnserver", "/usr/bin/turnserver")
    port = free_port()
    a = make_auth_app(tmp_path, yaml_edit=lambda t: t.replace("turn_port: 3478", f"turn_port: {port}")
                      .replace('turn_bind: "0.0.0.0"', 'turn_bind: "127.0.0.1"')
                      .replace("allowed_peer_ips: []", 'allowed_peer_ips: ["127.0.0.2"]'))
    cfg = config.load(a.data_dir)
    proc = subprocess.Popen([exe, "-c", str(turn.write_config(cfg)), "--no-stdout-log"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = tcp = None
    try:
        wait_stun("127.0.0.1", port)
        client = TurnClient(("127.0.0.1", port), *credentials(cfg))
        client.allocate()
        assert refused(client, "127.0.0.1") == 403  # the appliance itself
        assert refused(client, "127.0.0.3") == 403  # loopback not listed
        assert refused(client, "127.0.0.2") == 0  # listed by the site
        tcp = TurnClient(("127.0.0.1", port), *credentials(cfg))
        with pytest.raises(TurnError) as no_tcp:
            tcp.allocate(TCP)
        assert no_tcp.value.code == 442  # Unsupported Transport Protocol: no TCP relays
    finally:
        for c in (client, tcp):
            if c:
                c.close()
        proc.terminate()
        proc.wait(timeout=10)


class Namespace:
    """A network namespace with one veth pair: 10.232.N.1 (+ 10.233.N.1) outside,
    10.232.N.2 inside, and no route anywhere else."""

    def __init__(self) -> None:
        pid = os.getpid()
        n = pid % 200 + 20
        self.name, self.out_if, self.in_if = f"turnpeers{pid}", f"tpo{pid}", f"tpi{pid}"
        self.outside, self.other, self.inside = f"10.232.{n}.1", f"10.233.{n}.1", f"10.232.{n}.2"

    def sh(self, *args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, timeout=20)

    def up(self) -> None:
        self.down()
        self.sh("ip", "netns", "add", self.name)
        self.sh("ip", "link", "add", self.out_if, "type", "veth", "peer", "name", self.in_if)
        self.sh("ip", "link", "set", self.in_if, "netns", self.name)
        self.sh("ip", "addr", "add", f"{self.outside}/24", "dev", self.out_if)
        self.sh("ip", "addr", "add", f"{self.other}/24", "dev", self.out_if)
        self.sh("ip", "link", "set", self.out_if, "up")
        inside = ("ip", "netns", "exec", self.name)
        self.sh(*inside, "ip", "addr", "add", f"{self.inside}/24", "dev", self.in_if)
        self.sh(*inside, "ip", "link", "set", self.in_if, "up")
        self.sh(*inside, "ip", "link", "set", "lo", "up")

    def down(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.out_if], capture_output=True)


@pytest.fixture
def netns():
    require_tool("ip", "/usr/sbin/ip")
    if os.geteuid() != 0:  # like a missing tool: fails under CI, skipped elsewhere
        missing("network namespaces need root")
    ns = Namespace()
    ns.up()
    yield ns
    ns.down()


def test_guest_credentials_cannot_relay_to_private_metadata_or_own_addresses(tmp_path, netns):
    """Attack: from outside, with a guest's TURN credentials, ask the appliance's coturn
    (inside the namespace, configured by `appliance media turn-config` run there) for
    permissions to a private address the site did not list, the appliance's own address
    inside the listed range, the cloud metadata address and the other private ranges."""
    exe = require_tool("turnserver", "/usr/bin/turnserver")
    site = make_site(tmp_path)
    port = free_port()
    lan = netns.outside.rsplit(".", 1)[0] + ".0/24"
    path = site.data_dir / "appliance.yaml"
    path.write_text(path.read_text().replace("turn_port: 3478", f"turn_port: {port}")
                    .replace('turn_bind: "0.0.0.0"', f'turn_bind: "{netns.inside}"')
                    .replace("allowed_peer_ips: []", f'allowed_peer_ips: ["{lan}"]'))
    inside = ["ip", "netns", "exec", netns.name]
    wrote = subprocess.run([*inside, *appliance_cmd("media", "turn-config", "--data-dir",
                                                    str(site.data_dir))],
                           capture_output=True, text=True, timeout=60)
    assert wrote.returncode == 0, wrote.stderr
    cfg = config.load(site.data_dir)
    conf = turn.config_path(cfg).read_text()
    net = lan.rsplit(".", 1)[0]  # its own address (seen from inside) is cut out of the LAN
    assert f"allowed-peer-ip={net}.0-{net}.1\nallowed-peer-ip={net}.3-{net}.255\n" in conf
    proc = subprocess.Popen([*inside, exe, "-c", str(turn.config_path(cfg)), "--no-stdout-log"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = None
    try:
        wait_stun(netns.inside, port)
        client = TurnClient((netns.inside, port), *credentials(cfg))
        client.allocate()
        outcomes = {peer: refused(client, peer) for peer in (
            netns.other,        # a 10.x address the site did not list (a scanner, the PACS)
            netns.inside,       # the appliance itself, inside the listed LAN
            "169.254.169.254",  # cloud metadata
            "172.16.0.10", "192.168.1.10", "100.64.0.1", "127.0.0.1", "0.0.0.1",
            netns.outside,      # a bedside browser on the listed LAN
        )}
        assert outcomes == {**{p: 403 for p in outcomes}, netns.outside: 0}, outcomes
    finally:
        if client:
            client.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_turn_config_lists_denied_ranges_and_refuses_bad_allowed_entries(tmp_path):
    """The rendered config denies every local range (IPv6 too) and this machine's addresses;
    a typo in turn.allowed_peer_ips stops the start with its line."""
    a = make_auth_app(tmp_path, yaml_edit=lambda t: t.replace(
        "allowed_peer_ips: []", 'allowed_peer_ips: ["192.168.7.0/24"]'))
    cfg = config.load(a.data_dir)
    text = turn.render(cfg)
    for line in ("denied-peer-ip=10.0.0.0-10.255.255.255", "denied-peer-ip=127.0.0.0-127.255.255.255",
                 "denied-peer-ip=169.254.0.0-169.254.255.255",
                 "denied-peer-ip=172.16.0.0-172.31.255.255",
                 "denied-peer-ip=192.168.0.0-192.168.255.255",
                 "denied-peer-ip=100.64.0.0-100.127.255.255", "denied-peer-ip=::1",
                 "denied-peer-ip=fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                 "denied-peer-ip=fe80::-feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                 "allowed-peer-ip=192.168.7.0-192.168.7.255", "no-multicast-peers",
                 "no-tcp-relay"):
        assert line in text.splitlines(), line
    assert "allow-loopback-peers" not in text
    denied = [line.split("=", 1)[1].split("-") for line in text.splitlines()
              if line.startswith("denied-peer-ip=")]
    spans = [(ipaddress.ip_address(d[0]), ipaddress.ip_address(d[-1])) for d in denied]
    for addr in turn.own_addresses():
        assert any(lo.version == addr.version and lo <= addr <= hi for lo, hi in spans), addr
    # This machine's address inside a listed range is cut out of it, unless listed alone.
    own = {ipaddress.ip_address("192.168.7.10")}
    allowed, _denied, _lo = turn.peer_rules(["192.168.7.0/24"], own)
    assert allowed == ["192.168.7.0-192.168.7.9", "192.168.7.11-192.168.7.255"]
    assert turn.peer_rules(["192.168.7.10"], own)[0] == ["192.168.7.10"]
    path = a.data_dir / "appliance.yaml"
    before = path.read_text()
    path.write_text(before.replace('["192.168.7.0/24"]', '["192.168.7.0/24", "lan"]'))
    with pytest.raises(config.ConfigError, match=r"appliance.yaml:\d+:\d+: turn.allowed_peer_ips:"
                       r" entry 1: 'lan' is not an IP address or network"):
        config.load(a.data_dir)
