"""/readyz turns 503 with the right reason for each fault, and back to 200 once it is gone,
while the rest of the appliance keeps serving (real processes, real faults)."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import make_site, missing

READY_TIMEOUT_S = 40


def fetch(site, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(site.data_dir / "tls" / "ca.crt"))
    req = urllib.request.Request(f"https://localhost:{site.web_port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=15) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def readyz(site) -> tuple[int, dict]:
    status, body = fetch(site, "/readyz")
    return status, json.loads(body)


def wait_until(site, predicate, what: str, timeout: float = READY_TIMEOUT_S) -> dict:
    """Poll /readyz until ``predicate(status, body)`` holds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = readyz(site)
        if predicate(*last):
            return last[1]
        time.sleep(0.3)
    raise AssertionError(f"/readyz never showed {what}; last: {last}")


def wait_ready(site, expect: int, reason: str = "", timeout: float = READY_TIMEOUT_S) -> dict:
    """Poll /readyz until it answers ``expect`` (with ``reason`` among the reasons)."""
    return wait_until(site, lambda status, body: status == expect
                      and reason in " | ".join(body["reasons"]), f"{expect} {reason!r}", timeout)


def start_all(site) -> None:
    site.start_dicom()
    site.start("worker")
    site.start("web", wait_port=site.web_port)
    wait_ready(site, 200)


def echo_ok(site, dcmtk) -> bool:
    r = subprocess.run([dcmtk["echoscu"], "-aec", site.ae_title, "127.0.0.1",
                        str(site.dicom_port)], capture_output=True, timeout=30)
    return r.returncode == 0


@pytest.fixture(scope="module")
def running_site(tmp_path_factory, dcmtk):
    """One running appliance for the fault tests: each test restores what it broke."""
    site = make_site(tmp_path_factory.mktemp("health"))
    start_all(site)
    yield site
    site.stop_all()


@pytest.fixture(autouse=True)
def _healthy_before_each(request):
    if "running_site" in request.fixturenames:
        wait_ready(request.getfixturevalue("running_site"), 200)


def test_livez_and_healthz_alias(running_site):
    assert fetch(running_site, "/livez")[0] == 200
    status, body = fetch(running_site, "/healthz")
    data = json.loads(body)
    assert status == 200 and data["status"] == "ok" and data["reasons"] == []
    assert set(data["checks"]) >= {"database", "free_disk_mb", "dicom_port", "worker"}


def test_dicom_process_killed(running_site):
    site = running_site
    site.stop("dicom", signal.SIGKILL)
    body = wait_ready(site, 503, f"DICOM port {site.dicom_port} is not listening")
    assert body["status"] == "unavailable" and body["checks"]["dicom_port"] == "not listening"
    assert fetch(site, "/livez")[0] == 200  # the web keeps serving
    site.start_dicom()
    wait_ready(site, 200)


def test_worker_killed(running_site, dcmtk):
    site = running_site
    site.stop("worker", signal.SIGKILL)
    body = wait_ready(site, 503, "worker is not sweeping")
    assert body["checks"]["worker"] == "down"
    assert echo_ok(site, dcmtk)  # DICOM keeps answering
    site.start("worker")
    wait_ready(site, 200)


LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES ('lock-test', 'held')")
print("locked", flush=True)
sys.stdin.read()
"""


def test_database_locked_by_a_frozen_writer(running_site, dcmtk):
    site = running_site
    writer = subprocess.Popen([sys.executable, "-c", LOCKER, str(site.data_dir / "appliance.db")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        os.kill(writer.pid, signal.SIGSTOP)  # frozen while holding the write lock
        t0 = time.monotonic()
        body = wait_ready(site, 503, "database not writable: database is locked")
        assert body["checks"]["database"] == "error"
        assert time.monotonic() - t0 < 15  # bounded check, not the 10 s busy timeout per call
        assert fetch(site, "/livez")[0] == 200
        t1 = time.monotonic()
        status, body = fetch(site, "/status.json")  # the status page answers during the lock
        assert status == 503 and json.loads(body)["status"] == "red"
        assert time.monotonic() - t1 < 8
        assert echo_ok(site, dcmtk)
    finally:
        os.kill(writer.pid, signal.SIGCONT)
        writer.kill()
        writer.wait()
    wait_ready(site, 200)


@pytest.fixture
def tmpfs_site(tmp_path: Path):
    """A site whose data directory is a 5 MiB tmpfs, with a 1 MiB free-disk reserve."""
    if os.geteuid() != 0:
        missing("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], check=True)
    try:
        s = make_site(mnt)
        cfg = s.data_dir / "appliance.yaml"
        cfg.write_text(cfg.read_text().replace("low_water_mb: 0", "low_water_mb: 1"))
        yield s
        s.stop_all()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full(tmpfs_site, dcmtk):
    site = tmpfs_site
    start_all(site)
    filler = site.data_dir / "filler.bin"
    free = os.statvfs(site.data_dir).f_bavail * os.statvfs(site.data_dir).f_frsize
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(free - 256 * 1024, 0))  # leave 256 KiB: under the 1 MiB reserve
    body = wait_ready(site, 503, "is under the reserve of 1 MiB")
    assert body["checks"]["free_disk_mb"] < 1
    assert fetch(site, "/livez")[0] == 200
    assert echo_ok(site, dcmtk)
    filler.unlink()
    wait_ready(site, 200)


def test_sync_lag_over_limit(site):
    """A bundle waiting longer than health.sync_lag_limit_min makes /readyz 503."""
    from appliance.core import db

    cfg_path = site.data_dir / "appliance.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("\n  target: none\n", "\n  target: folder\n", 1)
                        .replace('\n  folder: ""', f'\n  folder: "{site.data_dir / "out"}"', 1))
    conn = db.open_db(site.data_dir / "appliance.db")
    conn.execute("INSERT INTO bundles (bundle_id, site_id, seq, kind, priority, state, path,"
                  " created_at) VALUES ('b1', 'test', 1, 'study', 1, 'built', 'x', ?)",
                  (time.time() - 5 * 3600,))
    conn.close()
    # The worker stays off: the sync sweep must not touch this hand-made bundle.
    site.start_dicom()
    site.start("web", wait_port=site.web_port)
    body = wait_ready(site, 503, "sync lag")
    assert body["checks"]["sync_lag_s"] >= 5 * 3600 - 60
    conn = db.connect(site.data_dir / "appliance.db")
    conn.execute("UPDATE bundles SET state = 'confirmed' WHERE bundle_id = 'b1'")
    conn.close()
    body = wait_until(site, lambda status, b: not any("sync lag" in r for r in b["reasons"]),
                      "the sync lag reason gone")
    assert body["checks"]["sync_lag_s"] == 0
