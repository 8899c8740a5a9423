"""install.sh's log holds the admin password of a first install: it must never be readable
by others, not even for the moment between being written and a later chmod.

The attack: another local user reads /var/log/appliance-install.log while the install runs.
The test runs cloud-init's own runcmd line (paths moved into a temp dir) under umask 000
with the real install.sh; a stand-in ``sha256sum`` on PATH (the kit check, the first tool
install.sh runs with its output going to the log) records the log's mode at that moment
and prints a fake password line into it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, missing

USER_DATA = ROOT / "provisioning" / "cloud-init" / "user-data.yaml"
KIT_LOG = "/var/log/appliance-install.log"
STUB = """#!/bin/sh
exec 3>&1
stat -L -c %a /proc/self/fd/3 > "{mode_file}"
echo "    fake-admin-password-0000"
exit 1
"""


def _install_command() -> str:
    """cloud-init's runcmd entry that runs install.sh (the one writing the log)."""
    runcmd = yaml.safe_load(USER_DATA.read_text())["runcmd"]
    [command] = [entry[2] for entry in runcmd if "install.sh" in entry[2]]
    return command


def _run(tmp_path: Path, log: Path) -> tuple[subprocess.CompletedProcess, str]:
    if os.geteuid() != 0:
        missing("install.sh runs as root only")
    kit, stubs = tmp_path / "kit", tmp_path / "bin"
    kit.mkdir()
    stubs.mkdir()
    shutil.copy(ROOT / "provisioning" / "install.sh", kit / "install.sh")
    (kit / "SHA256SUMS").write_text("0" * 64 + "  nothing\n")
    (tmp_path / "provision.yaml").write_text("site_name: Log test\n")
    mode_file = tmp_path / "mode"
    (stubs / "sha256sum").write_text(STUB.format(mode_file=mode_file))
    (stubs / "sha256sum").chmod(0o755)
    command = (_install_command().replace("/opt/appliance-kit", str(kit))
               .replace(KIT_LOG, str(log))
               .replace("/etc/appliance/provision.yaml", str(tmp_path / "provision.yaml")))
    assert str(log) in command and str(kit) in command
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60,
                            env={"PATH": f"{stubs}:/usr/sbin:/usr/bin:/sbin:/bin"},
                            preexec_fn=lambda: os.umask(0))
    return result, mode_file.read_text().strip()


def test_install_log_is_0600_when_the_password_is_written_even_under_umask_000(tmp_path):
    log = tmp_path / "appliance-install.log"
    result, mode_at_write = _run(tmp_path, log)
    assert mode_at_write == "600"
    assert log.stat().st_mode & 0o777 == 0o600
    text = log.read_text()
    assert "fake-admin-password-0000" in text and "the kit is damaged" in text
    # nothing on cloud-init's own output (/var/log/cloud-init-output.log is world-readable)
    assert result.stdout == "" and result.stderr == ""


def test_an_old_world_readable_log_is_made_private_before_anything_is_added(tmp_path):
    log = tmp_path / "appliance-install.log"
    log.write_text("an earlier run\n")
    log.chmod(0o644)
    _result, mode_at_write = _run(tmp_path, log)
    assert mode_at_write == "600" and log.stat().st_mode & 0o777 == 0o600
    assert log.read_text().startswith("an earlier run\n")


@pytest.mark.parametrize("bad", ["", "/nonexistent-dir/x.log"])
def test_install_log_option_errors_are_clear(tmp_path, bad):
    if os.geteuid() != 0:
        missing("install.sh runs as root only")
    result = subprocess.run(["sh", str(ROOT / "provisioning" / "install.sh"), "--log", bad],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    if bad:
        assert "cannot create the log" in result.stderr
