"""Network namespaces for consult fault tests and the soak: one side of a call behind a veth.

``Netns`` makes the namespace and breaks its network with iptables / tc (only inside it);
``Guest`` drives a Chromium running inside it through ``consult_guest_process.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


class Netns:
    """A namespace with one veth to the host: 10.231.N.1 (host) <-> 10.231.N.2 (inside)."""

    def __init__(self) -> None:
        n = os.getpid() % 200 + 20
        self.name, self.host_if, self.ns_if = f"h9c{n}", f"h9a{n}", f"h9b{n}"
        self.host_ip, self.ns_ip = f"10.231.{n}.1", f"10.231.{n}.2"

    def up(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        sh("ip", "netns", "add", self.name)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.name)
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        self.run("ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if)
        self.run("ip", "link", "set", self.ns_if, "up")
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *args: str) -> None:
        sh("ip", "netns", "exec", self.name, *args)

    def block_udp(self) -> None:
        for chain in ("INPUT", "OUTPUT"):
            self.run("iptables", "-I", chain, "-p", "udp", "-j", "DROP")

    def block_all(self) -> None:
        """Every packet in or out of the namespace, TCP (the app's own channel) included."""
        self.run("iptables", "-I", "INPUT", "!", "-i", "lo", "-j", "DROP")
        self.run("iptables", "-I", "OUTPUT", "!", "-o", "lo", "-j", "DROP")

    def lose_udp(self, p: float) -> None:
        for chain in ("INPUT", "OUTPUT"):
            self.run("iptables", "-I", chain, "-p", "udp", "-m", "statistic", "--mode", "random",
                     "--probability", str(p), "-j", "DROP")

    def heal(self) -> None:
        self.run("iptables", "-F")

    def down(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)


class Guest:
    """The browser inside the namespace, one JSON command at a time."""

    def __init__(self, ns: Netns, chromium: str):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable,
             str(HERE / "consult_guest_process.py"), chromium],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)

    def do(self, cmd: str, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline() or '{"ok": false, "error": "exited"}')
        assert answer["ok"], answer["error"]
        return answer["value"]

    def close(self) -> None:
        try:
            self.proc.stdin.write('{"cmd": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
