"""Provisioning artefacts checked by the tools that will run them: systemd, Vagrant, cloud-init."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, require_tool

UNITS_DIR = ROOT / "provisioning" / "systemd"
SERVICES = sorted(p.name for p in UNITS_DIR.glob("*.service"))
MAX_EXPOSURE = 2.0


def test_every_component_has_a_unit():
    assert SERVICES == [f"appliance-{n}.service" for n in ("dicom", "media", "turn", "web",
                                                             "worker")]
    target = (UNITS_DIR / "appliance.target").read_text()
    for unit in SERVICES:
        assert unit in target


def _fake_root(tmp_path: Path) -> Path:
    """A filesystem root holding our units, systemd's own units and the binaries they run."""
    root = tmp_path / "root"
    (root / "etc" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system",
                    symlinks=True)
    shutil.copytree(UNITS_DIR, root / "etc" / "systemd" / "system")
    for exe in ("opt/appliance/venv/bin/appliance", "usr/bin/turnserver"):
        path = root / exe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    (root / "etc" / "appliance").mkdir()
    (root / "etc" / "appliance" / "appliance.env").write_text("APPLIANCE_DATA_DIR=/var/lib/x\n")
    return root


def _verify(root: Path, *units: str) -> subprocess.CompletedProcess:
    tool = require_tool("systemd-analyze")
    return subprocess.run([tool, "verify", "--man=no", f"--root={root}", *units],
                          cwd=root / "etc" / "systemd" / "system", capture_output=True,
                          text=True, timeout=60)


def test_systemd_analyze_verify_passes_without_warnings(tmp_path):
    root = _fake_root(tmp_path)
    result = _verify(root, "appliance.target", *SERVICES)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # parse warnings do not fail the exit code


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a typo in a unit is reported."""
    root = _fake_root(tmp_path)
    unit_dir = root / "etc" / "systemd" / "system"
    text = (unit_dir / "appliance-web.service").read_text()
    (unit_dir / "broken.service").write_text(text.replace("Restart=on-failure", "Restart=often"))
    result = _verify(root, "broken.service")
    assert "restart specifier" in result.stderr


@pytest.mark.parametrize("unit", SERVICES)
def test_systemd_security_exposure_at_most_2(unit):
    tool = require_tool("systemd-analyze")
    result = subprocess.run([tool, "security", "--offline=true", "--no-pager",
                             str(UNITS_DIR / unit)], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    print(f"{unit}: exposure {score}")
    assert score <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("unit", SERVICES)
def test_units_restart_on_failure_and_never_run_as_root(unit):
    text = (UNITS_DIR / unit).read_text()
    assert "Restart=on-failure" in text
    assert re.search(r"^User=(appliance|turnserver)$", text, re.M)
    for key in ("ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes"):
        assert key in text
    # Privileged ports come from one ambient capability, and only that one.
    caps = re.findall(r"^CapabilityBoundingSet=(.*)$", text, re.M)
    assert caps and set(" ".join(caps).split()) <= {"CAP_NET_BIND_SERVICE"}


def test_units_start_in_order():
    web = (UNITS_DIR / "appliance-web.service").read_text()
    worker = (UNITS_DIR / "appliance-worker.service").read_text()
    media = (UNITS_DIR / "appliance-media.service").read_text()
    assert "appliance-dicom.service" in re.search(r"^After=(.*)$", web, re.M).group(1)
    assert "appliance-dicom.service" in re.search(r"^After=(.*)$", worker, re.M).group(1)
    assert "appliance-web.service" in re.search(r"^After=(.*)$", media, re.M).group(1)


def _vagrant(tmp_path: Path, kit: Path | None) -> subprocess.CompletedProcess:
    tool = require_tool("vagrant")
    work = tmp_path / "vagrant"
    work.mkdir()
    shutil.copy(ROOT / "Vagrantfile", work / "Vagrantfile")
    env = {**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"}
    env.pop("APPLIANCE_KIT", None)
    if kit is not None:
        env["APPLIANCE_KIT"] = str(kit)
    return subprocess.run([tool, "validate", "--ignore-provider"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)


def test_vagrantfile_validates(tmp_path):
    kit = tmp_path / "kit"
    kit.mkdir()
    result = _vagrant(tmp_path, kit)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_vagrantfile_without_a_kit_is_refused(tmp_path):
    result = _vagrant(tmp_path, tmp_path / "no-such-kit")
    assert result.returncode != 0
    assert "no-such-kit" in result.stdout + result.stderr


def test_vagrantfile_forwards_dicom_and_web_ports():
    text = (ROOT / "Vagrantfile").read_text()
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert re.search(r'forwarded_port", guest: DICOM_PORT', text)
    assert re.search(r'forwarded_port", guest: WEB_PORT', text)
    assert "install.sh" in text


def _cloud_init_schema(path: Path) -> subprocess.CompletedProcess:
    tool = require_tool("cloud-init")
    return subprocess.run([tool, "schema", "--config-file", str(path)], capture_output=True,
                          text=True, timeout=120)


def test_cloud_init_user_data_is_valid():
    result = _cloud_init_schema(ROOT / "provisioning" / "cloud-init" / "user-data.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_cloud_init_schema_rejects_a_broken_file(tmp_path):
    text = (ROOT / "provisioning" / "cloud-init" / "user-data.yaml").read_text()
    broken = tmp_path / "user-data.yaml"
    broken.write_text(text.replace("runcmd:\n", "runcmd: 5\nignored:\n", 1))
    result = _cloud_init_schema(broken)
    assert result.returncode != 0
