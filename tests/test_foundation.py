"""The data directory, the CLI, configuration validation, the supervisor."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import pytest
from conftest import appliance_cmd, free_port, make_site, run_cli, wait_for_port


def test_init_creates_data_dir_with_private_keys(tmp_path):
    site = make_site(tmp_path)
    d = site.data_dir
    for sub in ("workflows", "studies", "bundles", "keys", "tls", "logs"):
        assert (d / sub).is_dir(), sub
    for secret in ("keys/identity.key", "tls/ca.key", "tls/server.key", "appliance.db",
                   "appliance.yaml"):
        mode = stat.S_IMODE(os.stat(d / secret).st_mode)
        assert mode == 0o600, f"{secret} is {oct(mode)}"
    assert len(site.admin_password) >= 20
    # The password is not stored in clear anywhere in the data directory.
    for path in d.rglob("*"):
        if path.is_file():
            assert site.admin_password.encode() not in path.read_bytes(), path


def test_init_refuses_existing_directory_without_force(tmp_path):
    site = make_site(tmp_path)
    (site.data_dir / "studies" / "keep.txt").write_text("patient data")
    again = run_cli("init", "--data-dir", str(site.data_dir))
    assert again.returncode == 1
    assert again.stderr.startswith("error:") and "--force" in again.stderr
    assert (site.data_dir / "studies" / "keep.txt").exists()
    forced = run_cli("init", "--data-dir", str(site.data_dir), "--force")
    assert forced.returncode == 0, forced.stderr
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("site.replaced-")]
    assert kept and (kept[0] / "studies" / "keep.txt").read_text() == "patient data"


def test_data_dir_from_environment(tmp_path):
    site = make_site(tmp_path)
    result = run_cli("status", "--json", env={"APPLIANCE_DATA_DIR": str(site.data_dir)})
    assert '"studies": 0' in result.stdout


def test_every_command_has_help():
    for cmd in (["init"], ["up"], ["dicom"], ["web"], ["worker"], ["status"], ["ae", "add"],
                ["ae", "list"], ["ae", "remove"]):
        result = run_cli(*cmd, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout, cmd


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("store_from: any", "store_form: any"), "dicom.store_form: unknown key"),
        (("port: {dicom}", "port: eleven"), "dicom.port: expected an integer"),
        (("max_associations: 16", "max_associations: 0"), "dicom.max_associations: must be greater"),
        (("level: info", "level: loud"), "logging.level: must be one of"),
        (("store_from: any", "store_from: [any"), "not valid YAML"),
    ],
)
def test_invalid_config_is_refused_with_key_path_and_line(tmp_path, edit, expected):
    site = make_site(tmp_path)
    cfg = site.data_dir / "appliance.yaml"
    old, new = (s.replace("{dicom}", str(site.dicom_port)) for s in edit)
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new, 1))
    before = sorted(p.name for p in site.data_dir.iterdir())
    result = site.cli("dicom")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and expected in line, line
    assert "appliance.yaml:" in line  # names the file and line
    assert sorted(p.name for p in site.data_dir.iterdir()) == before


def test_missing_config_is_a_clear_error(tmp_path):
    result = run_cli("status", "--data-dir", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "missing" in result.stderr and "appliance init" in result.stderr


def test_migrations_are_numbered_and_applied_once(tmp_path):
    from appliance.core import db

    versions = [n for n, _, _ in db.MIGRATIONS]
    assert versions == sorted(set(versions)) and versions[0] == 1
    conn = db.open_db(tmp_path / "x.db")
    assert db.schema_version(conn) == versions[-1]
    assert db.migrate(conn) == versions[-1]  # a second start changes nothing
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_migration_landing_below_an_applied_one_is_still_applied(tmp_path, monkeypatch):
    from appliance.core import db

    full = list(db.MIGRATIONS)
    late = full[-2]  # pretend this one landed after the last one was applied
    monkeypatch.setattr(db, "MIGRATIONS", [m for m in full if m is not late])
    conn = db.open_db(tmp_path / "x.db")
    assert late[0] not in db.applied_migrations(conn)
    monkeypatch.setattr(db, "MIGRATIONS", full)
    db.migrate(conn)
    assert late[0] in db.applied_migrations(conn)
    assert {n for n, _, _ in full} == db.applied_migrations(conn)


def test_an_old_database_without_the_ledger_is_not_migrated_twice(tmp_path):
    from appliance.core import db

    conn = db.open_db(tmp_path / "x.db")
    conn.execute("DROP TABLE schema_migrations")  # as made before the ledger existed
    assert db.migrate(conn) == db.MIGRATIONS[-1][0]  # would fail re-creating tables
    assert db.applied_migrations(conn) == {n for n, _, _ in db.MIGRATIONS}


def test_up_runs_every_component_and_stops_on_sigterm(tmp_path, dcmtk):
    site = make_site(tmp_path)
    proc = subprocess.Popen(appliance_cmd("up", "--data-dir", str(site.data_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for_port(site.dicom_port, proc=proc)
        wait_for_port(site.web_port, proc=proc)
        echo = subprocess.run([dcmtk["echoscu"], "127.0.0.1", str(site.dicom_port)],
                              capture_output=True)
        assert echo.returncode == 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = site.cli("status", "--json")
            if status.returncode == 0:
                break
            time.sleep(0.3)
        assert status.returncode == 0, status.stdout
        # A crashed child is restarted.
        import json

        dicom_pid = json.loads(status.stdout)["components"]["dicom"]["pid"]
        os.kill(dicom_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        restarted = False
        while time.monotonic() < deadline and not restarted:
            time.sleep(0.3)
            info = json.loads(site.cli("status", "--json").stdout)["components"]["dicom"]
            restarted = info["up"] and info["pid"] != dicom_pid
        assert restarted, "dicom was not restarted"
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert time.monotonic() - started < 10
        assert f"port {site.dicom_port}" in out and f"https://localhost:{site.web_port}/" in out
        assert "restart #1" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_children_stop_when_the_supervisor_is_killed(tmp_path):
    site = make_site(tmp_path)
    proc = subprocess.Popen(appliance_cmd("up", "--data-dir", str(site.data_dir)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_port(site.dicom_port, proc=proc)
        wait_for_port(site.web_port, proc=proc)
        os.kill(proc.pid, signal.SIGKILL)  # no chance to stop its children itself
        proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not _listening(site.dicom_port) and not _listening(site.web_port):
                break
            time.sleep(0.2)
        assert not _listening(site.dicom_port) and not _listening(site.web_port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_health_endpoints_answer_json(tmp_path):
    import ssl
    import urllib.request

    site = make_site(tmp_path)
    site.start("web", wait_port=site.web_port)
    ctx = ssl.create_default_context(cafile=str(site.data_dir / "tls" / "ca.crt"))
    for path in ("/livez", "/readyz", "/healthz"):
        try:
            with urllib.request.urlopen(f"https://localhost:{site.web_port}{path}",
                                        context=ctx, timeout=10) as r:
                code, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            code, body = e.code, e.read()
        import json

        doc = json.loads(body)
        if path == "/livez":
            assert code == 200 and doc["status"] == "ok"
        else:
            # No DICOM node and no worker running: not ready, and it says why.
            assert code == 503
            assert any("DICOM port" in r for r in doc["reasons"])
            assert any("worker" in r for r in doc["reasons"])
    site.stop_all()
    assert free_port()
