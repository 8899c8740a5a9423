"""The fresh-machine test: bare Debian 12 (debootstrap), the offline kit, install.sh with no
network, then the installed appliance answering C-ECHO and C-STORE from outside.

Slow (a Debian root filesystem, ~120 packages and ~35 wheels installed): run by
``make test-slow`` and once per CI run. The debootstrap result is cached under
/var/cache between runs, keyed by suite and date.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, missing, require_tool
from dicom_data import write_series

pytestmark = pytest.mark.slow

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
CACHE = Path("/var/cache/field-appliance-test")
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME": "/root", "LANG": "C.UTF-8"}


def _need_root() -> None:
    if os.geteuid() != 0:
        missing("the fresh-machine test needs root (debootstrap, chroot, unshare)")


def debian_root(tmp_path: Path) -> Path:
    """A fresh copy of a minimal Debian 12 root filesystem (debootstrap, cached per day)."""
    tool = require_tool("debootstrap")
    key = f"debootstrap-{SUITE}-minbase-{datetime.date.today():%Y%m%d}"
    cached = CACHE / key
    if not (cached / ".complete").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        for old in CACHE.glob(f"debootstrap-{SUITE}-*"):
            shutil.rmtree(old, ignore_errors=True)
        building = CACHE / f"{key}.building"
        result = subprocess.run([tool, "--variant=minbase", SUITE, str(building), MIRROR],
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        (building / ".complete").write_text("ok\n")
        building.rename(cached)
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(cached), str(root)], check=True)
    (root / ".complete").unlink()
    return root


def build_kit(out: Path) -> Path:
    args = [str(ROOT / "provisioning" / "build-offline-kit")]
    if not (ROOT / "appliance" / "web" / "static" / "viewer").is_dir():
        args.append("--no-viewer")  # fetching the viewer needs npm; the tree has none yet
    result = subprocess.run([*args, str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    return Path(result.stdout.strip().splitlines()[-1])


def in_chroot(root: Path, *argv: str, network: bool) -> list[str]:
    """argv run inside ``root`` with /proc and /dev; without a network namespace of its own
    when ``network`` (the appliance must be reachable from outside)."""
    mounts = f"mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev"
    cmd = " ".join(_quote(a) for a in ("chroot", str(root), "env", "-i",
                                      *[f"{k}={v}" for k, v in CLEAN_ENV.items()], *argv))
    flags = ["-m", "--fork"] + ([] if network else ["-n"])
    return ["unshare", *flags, "sh", "-c", f"{mounts} && exec {cmd}"]


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _wait_echo(echoscu: str, port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the appliance exited"
        r = subprocess.run([echoscu, "-aec", "CHROOTAE", "127.0.0.1", str(port)],
                           capture_output=True, timeout=30)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"no C-ECHO answer on port {port} in {timeout} s")


def test_fresh_debian_offline_install_then_echo_and_store(tmp_path, dcmtk):
    _need_root()
    for tool in ("unshare", "chroot"):
        require_tool(tool)
    t0 = time.monotonic()
    root = debian_root(tmp_path)
    kit = build_kit(tmp_path / "dist")
    shutil.copytree(kit, root / "opt" / "appliance-kit", symlinks=True)
    print(f"\nprepared root filesystem and kit in {time.monotonic() - t0:.1f} s "
          f"(kit {sum(f.stat().st_size for f in kit.rglob('*') if f.is_file()) / 1e6:.0f} MB)")
    dicom_port, web_port = free_port(), free_port()

    start = time.monotonic()
    install = subprocess.run(
        in_chroot(root, "/opt/appliance-kit/install.sh", "--site-name", "Fresh machine",
                  "--ae-title", "FRESHAPP", "--dicom-port", str(dicom_port),
                  "--web-port", str(web_port), network=False),
        capture_output=True, text=True, timeout=900)
    install_s = time.monotonic() - start
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    out = install.stdout
    assert "AE title FRESHAPP  at" in out and f":{dicom_port}" in out
    assert f":{web_port}/" in out
    password = out.split("write it down):", 1)[1].split()[0]
    assert len(password) >= 20
    data = root / "var" / "lib" / "appliance"
    assert (data / "appliance.yaml").is_file()
    assert (root / "etc" / "appliance" / "appliance.yaml").is_symlink()
    assert (root / "etc" / "systemd" / "system" / "appliance-dicom.service").is_file()
    assert (data / "keys" / "identity.key").stat().st_mode & 0o777 == 0o600
    turn_conf = root / "etc" / "appliance" / "turnserver.conf"
    if (root / "usr" / "bin" / "turnserver").exists():  # coturn came from the kit
        assert turn_conf.is_symlink()
        real = data / "turn" / "turnserver.conf"
        assert real.stat().st_mode & 0o777 == 0o600 and "static-auth-secret=" in real.read_text()

    up = subprocess.Popen(
        in_chroot(root, "runuser", "-u", "appliance", "--", "/opt/appliance/venv/bin/appliance",
                  "up", "--data-dir", "/var/lib/appliance", network=True),
        stdout=open(tmp_path / "up.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_echo(dcmtk["echoscu"], dicom_port, up, timeout=120)
        _study, _series, files = write_series(tmp_path / "ct", 3, rows=64, cols=64)
        stored = subprocess.run([dcmtk["storescu"], "-aec", "FRESHAPP", "127.0.0.1",
                                 str(dicom_port), *map(str, files)],
                                capture_output=True, text=True, timeout=120)
        first_store_s = time.monotonic() - start
        assert stored.returncode == 0, stored.stdout + stored.stderr
        print(f"install.sh: {install_s:.1f} s; install.sh start to first C-STORE accepted: "
              f"{first_store_s:.1f} s (target < 300 s)")
        conn = sqlite3.connect(data / "appliance.db")
        count = conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        conn.close()
        assert count == 3
        assert first_store_s < 300
        # The installed web app answers too, and reports every component ready.
        _wait_ready_https(root, web_port, up)
        _open_consult_pages(root, web_port)
        if (kit / "viewer").is_dir():  # the viewer went where the web app serves it from
            site_packages = next((root / "opt" / "appliance" / "venv" / "lib").glob(
                "python3*/site-packages"))
            assert (site_packages / "appliance/web/static/viewer/index.html").is_file()
    finally:
        _stop(up)
    owner = data.stat().st_uid
    assert owner != 0 and all(p.stat().st_uid == owner for p in (data / "studies").rglob("*"))

    # A second run repairs and upgrades in place: same site, data kept, migrations applied.
    again = subprocess.run(
        in_chroot(root, "/opt/appliance-kit/install.sh", network=False),
        capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "keeping the site" in again.stdout and "database schema version" in again.stdout
    assert "admin login: unchanged" in again.stdout
    conn = sqlite3.connect(data / "appliance.db")
    assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 3
    conn.close()


def test_damaged_kit_is_refused_before_anything_changes(tmp_path):
    """install.sh checks every checksum first (no root filesystem needed for this one)."""
    _need_root()
    kit = tmp_path / "kit"
    kit.mkdir()
    shutil.copy(ROOT / "provisioning" / "install.sh", kit / "install.sh")
    (kit / "wheels").mkdir()
    (kit / "wheels" / "x.whl").write_bytes(b"original")
    subprocess.run("sha256sum install.sh wheels/x.whl > SHA256SUMS", shell=True, cwd=kit,
                   check=True)
    (kit / "wheels" / "x.whl").write_bytes(b"tampered")
    result = subprocess.run([str(kit / "install.sh"), "--data-dir", str(tmp_path / "data")],
                            capture_output=True, text=True, timeout=60, env=CLEAN_ENV)
    assert result.returncode == 1
    assert "kit is damaged" in result.stderr
    assert not (tmp_path / "data").exists()


def _https(root: Path, port: int, path: str) -> tuple[int, bytes]:
    import ssl
    import urllib.error
    import urllib.request

    ca = root / "var" / "lib" / "appliance" / "tls" / "ca.crt"
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(f"https://localhost:{port}{path}", context=ctx,
                                    timeout=15) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def _wait_ready_https(root: Path, port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    last = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the appliance exited"
        last = _https(root, port, "/readyz")
        if last[0] == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"the installed appliance never became ready: {last}")


def _open_consult_pages(root: Path, port: int) -> None:
    """/consults and a consult room render from the installed package (a kit's wheel once had
    no consult templates, so these pages failed on every field install)."""
    code = ("from appliance.accounts import users; from appliance.consults import rooms;"
            " from appliance.core import config, db; cfg = config.load('/var/lib/appliance');"
            " c = db.connect(cfg.db_path); users.add_user(c, 'kitcheck', 'admin', KITCHECK_PW);"
            " print(rooms.create_consult(c, 'kitcheck', title='Kit check room')); c.close()"
            ).replace("KITCHECK_PW", repr(KITCHECK_PW))
    made = subprocess.run(in_chroot(root, "runuser", "-u", "appliance", "--",
                                    "/opt/appliance/venv/bin/python", "-c", code, network=False),
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    consult_id = int(made.stdout.strip().splitlines()[-1])
    opener = _signed_in(root, port, "kitcheck", KITCHECK_PW)
    for path, marker in (("/consults", 'data-testid="consults"'),
                         (f"/consults/{consult_id}", 'data-testid="device-check"')):
        with opener.open(f"https://localhost:{port}{path}", timeout=15) as resp:
            body = resp.read().decode()
        assert resp.status == 200 and marker in body and "Kit check room" in body, path


KITCHECK_PW = "kit-check-password-1"


def _signed_in(root: Path, port: int, username: str, password: str):
    """A urllib opener holding a signed-in session cookie (CSRF token from the form)."""
    import http.cookiejar
    import re
    import ssl
    import urllib.parse
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(root / "var/lib/appliance/tls/ca.crt"))
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ctx),
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    base = f"https://localhost:{port}"
    with opener.open(f"{base}/login", timeout=15) as resp:
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', resp.read().decode()).group(1)
    form = urllib.parse.urlencode({"username": username, "password": password,
                                   "csrf_token": csrf}).encode()
    with opener.open(f"{base}/login", data=form, timeout=15) as resp:
        assert "/login" not in urllib.parse.urlparse(resp.url).path, "sign-in failed"
    return opener


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the chroot's process group (runuser passes it on to appliance up)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
