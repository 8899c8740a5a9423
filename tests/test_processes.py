"""One answer to "is that process still there?" for heartbeats, metric files and leases."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from appliance.core import leases, processes


def _dead_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_alive_tells_a_live_process_from_a_gone_one() -> None:
    assert processes.alive(os.getpid())
    assert processes.alive(1)  # init: another user's process counts as alive
    assert not processes.alive(_dead_pid())
    assert not processes.alive(None)
    assert not processes.alive(0)
    assert not processes.alive(-1)


def test_a_lease_of_a_dead_process_here_is_gone_and_of_another_host_is_not() -> None:
    here = socket.gethostname()
    dead = _dead_pid()
    assert leases.holder_gone(f"{here}:{dead}:abcd1234")
    assert not leases.holder_gone(leases.new_owner())
    assert not leases.holder_gone(f"elsewhere-{here}:{dead}:abcd1234")
    assert not leases.holder_gone(f"{here}:not-a-pid:abcd1234")
    assert leases.holder_gone("")
