"""``appliance up``: run every component as its own child process, in the foreground.

One crashing child never takes another down: it is restarted with an
exponential backoff (1 s doubling to 30 s, reset after a minute of health),
and each restart is logged.  SIGTERM or SIGINT stops all children: SIGTERM
first, SIGKILL for any still running after the grace period.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from appliance.consults import turn
from appliance.core import config

log = logging.getLogger("appliance.up")

COMPONENTS = ("dicom", "web", "worker")
GRACE_S = 7.0
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_START_S
    next_start: float = 0.0
    restarts: int = 0
    history: list[float] = field(default_factory=list)


def _die_with_supervisor() -> None:
    """In the child before exec: get SIGTERM when the supervisor dies, even by SIGKILL.

    Otherwise a killed ``appliance up`` leaves its children holding the ports,
    and the next ``appliance up`` cannot start.  Linux only; elsewhere a no-op.
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_argv(name: str, data_dir: str) -> list[str]:
    return [sys.executable, "-m", "appliance", name, "--data-dir", data_dir]


class Supervisor:
    def __init__(self, cfg: config.Config, names: tuple[str, ...] = COMPONENTS):
        self.cfg = cfg
        self.children = [Child(n, child_argv(n, str(cfg.data_dir))) for n in names]
        if names == COMPONENTS and turn.binary():  # coturn relays consult media, if installed
            self.children.append(Child("turn", turn.command(cfg)))
        if names == COMPONENTS and importlib.util.find_spec("aiortc"):  # consult media service
            self.children.append(Child("media", [sys.executable, "-m", "appliance", "media",
                                                 "serve", "--data-dir", str(cfg.data_dir)]))
        self.stopping = threading.Event()

    def _start(self, child: Child) -> None:
        env = dict(os.environ, APPLIANCE_DATA_DIR=str(self.cfg.data_dir), PYTHONUNBUFFERED="1")
        child.proc = subprocess.Popen(child.argv, env=env, start_new_session=True,
                                      preexec_fn=_die_with_supervisor)
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def _check(self, child: Child, now: float) -> None:
        if child.proc is None:
            if now >= child.next_start:
                self._start(child)
            return
        code = child.proc.poll()
        if code is None:
            if now - child.started_at > HEALTHY_AFTER_S:
                child.backoff = BACKOFF_START_S
            return
        child.proc = None
        child.restarts += 1
        child.history.append(time.time())
        child.next_start = now + child.backoff
        log.error("%s exited with code %s; restart #%d in %.0f s", child.name, code,
                  child.restarts, child.backoff)
        child.backoff = min(child.backoff * 2, BACKOFF_MAX_S)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, f: self.stopping.set())
        for child in self.children:
            self._start(child)
        while not self.stopping.wait(0.5):
            now = time.monotonic()
            for child in self.children:
                self._check(child, now)
        self.stop_all()
        return 0

    def stop_all(self) -> None:
        running = [c for c in self.children if c.proc and c.proc.poll() is None]
        for c in running:
            try:
                c.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + GRACE_S
        for c in running:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", c.name, GRACE_S)
                os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
        log.info("all components stopped")
