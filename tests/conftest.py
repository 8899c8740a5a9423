"""Shared fixtures: real tools, a real data directory, real processes on free ports.

Under ``CI=true`` a test that needs a tool (dcmtk, Orthanc, Chromium …) fails
when the tool is missing; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ARTIFACTS = ROOT / "test-artifacts"


def missing(message: str) -> NoReturn:
    """Something a test needs is not here: under CI that is a failure, elsewhere a skip."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str, path: str | None = None) -> str:
    """Path of an external tool; fail under CI when it is missing, skip elsewhere."""
    found = path if path and os.path.exists(path) else shutil.which(name)
    if found:
        return found
    missing(f"{name} is not installed (make test installs it when run as root)")


def require_module(name: str):
    """Import a test dependency; fail under CI when it is missing, skip elsewhere."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"{name} is not importable ({e}); make test installs the test extras")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open in {timeout} s")


def appliance_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance", *args]


def run_cli(*args: str, input: str | None = None, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run(appliance_cmd(*args), capture_output=True, text=True, input=input,
                            env={**os.environ, **(env or {})}, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} failed: {result.stderr}")
    return result


class Site:
    """A data directory made by ``appliance init`` with free ports."""

    def __init__(self, data_dir: Path, dicom_port: int, web_port: int, admin_password: str):
        self.data_dir = data_dir
        self.dicom_port = dicom_port
        self.web_port = web_port
        self.admin_password = admin_password
        self.ae_title = "FIELDAPP"
        self.procs: dict[str, subprocess.Popen] = {}

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run_cli(*args, "--data-dir", str(self.data_dir), **kw)

    def start(self, component: str, wait_port: int | None = None,
              env: dict | None = None) -> subprocess.Popen:
        log = open(self.data_dir / "logs" / f"test-{component}.out", "ab")
        proc = subprocess.Popen(
            appliance_cmd(component, "--data-dir", str(self.data_dir)),
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs[component] = proc
        if wait_port:
            wait_for_port(wait_port, proc=proc)
        return proc

    def start_dicom(self, **kw) -> subprocess.Popen:
        return self.start("dicom", wait_port=self.dicom_port, **kw)

    def stop(self, component: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(component, None)
        if proc and proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def db(self):
        from appliance.core import db

        return db.connect(self.data_dir / "appliance.db")


_SITES: list[Site] = []  # every site a test made, so none of their processes outlive the run


@pytest.fixture(scope="session", autouse=True)
def _stop_every_site() -> Iterator[None]:
    yield
    for s in _SITES:
        s.stop_all()
    orthanc = sys.modules.get("orthanc")  # a test that failed before its pacs.stop()
    for pacs in getattr(orthanc, "STARTED", []):
        pacs.stop(kill=True)


def make_site(base: Path, **init_args: str) -> Site:
    data_dir = base / "site"
    dicom_port, web_port = free_port(), free_port()
    args = ["init", "--data-dir", str(data_dir), "--dicom-port", str(dicom_port),
            "--web-port", str(web_port), "--site-name", "Test Site"]
    for key, value in init_args.items():
        args += [f"--{key.replace('_', '-')}", value]
    result = run_cli(*args, check=True)
    password = result.stdout.strip().splitlines()[-1].strip()
    # Tests run on tmpfs-sized disks too: no low-water refusal unless a test sets one.
    cfg = data_dir / "appliance.yaml"
    cfg.write_text(cfg.read_text().replace("low_water_mb: 500", "low_water_mb: 0"))
    made = Site(data_dir, dicom_port, web_port, password)
    _SITES.append(made)
    return made


@pytest.fixture
def pacs(tmp_path: Path):
    """A real Orthanc as the site PACS, knowing our node (tests/forwarding_site.py)."""
    from forwarding_site import site_pacs

    p = site_pacs(tmp_path / "orthanc")
    p.start()
    yield p
    p.stop(kill=True)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = make_site(tmp_path)
    yield s
    s.stop_all()


@pytest.fixture
def dicom_site(site: Site) -> Site:
    """A site with its DICOM node running."""
    site.start_dicom()
    return site


@pytest.fixture(scope="session")
def dcmtk() -> dict[str, str]:
    tools = {}
    for name in ("echoscu", "storescu", "findscu", "movescu", "getscu", "storescp", "dcmdump"):
        tools[name] = require_tool(name)
    return tools


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
