"""The appliance as a wheel installs it: every template renders and every static file is served.

A wheel carries only the package-data globs pyproject.toml lists; once it had no
web/templates/consults/ and /consults failed on every kit-installed box while every test
(run from the tree) passed. So this builds the wheel, installs it into a fresh venv, and
drives the installed copy from a temp dir, where nothing of the tree can be found.
No network: the build reuses this venv's setuptools and the new venv sees this venv's
packages through a .pth file (every dependency is already installed here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import ROOT

PROBE = Path(__file__).with_name("installed_app_probe.py")
WEB = ROOT / "appliance" / "web"
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "viewer", "*.egg-info", "build")


def tree_files(folder: Path) -> set[str]:
    """Files under ``folder`` in the tree, relative to it (the viewer is fetched, not packaged)."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and "viewer" not in p.relative_to(folder).parts
            and "__pycache__" not in p.parts}


def build_wheel(tmp_path: Path) -> Path:
    """The project's wheel, built from a copy of the tree (so the build leaves nothing in it)."""
    src = tmp_path / "src"
    for name in ("appliance", "dicom_node", "workflows"):
        shutil.copytree(ROOT / name, src / name, ignore=SKIP)
    shutil.copy(ROOT / "pyproject.toml", src / "pyproject.toml")
    out = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel",
                    "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("field_appliance-*.whl")
    return wheel


def fresh_venv(tmp_path: Path) -> Path:
    """A new venv whose own site-packages comes first, then this venv's (for dependencies)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True).stdout
    Path(site.strip(), "shared-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def clean_env() -> dict[str, str]:
    """No PYTHONPATH (it points at the tree when tests run from a worktree)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_the_wheel_carries_every_template_and_static_file(tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(build_wheel(tmp_path)).namelist())
    for folder in ("templates", "static"):
        wanted = {f"appliance/web/{folder}/{f}" for f in tree_files(WEB / folder)}
        assert wanted - names == set(), f"pyproject.toml package-data misses web/{folder} files"
    assert any(n.startswith("appliance/web/templates/consults/") for n in names)
    assert {f"appliance/reports/templates/{f}" for f in
            tree_files(ROOT / "appliance" / "reports" / "templates")} <= names


def test_the_installed_app_renders_every_template_and_serves_every_static_file(
        tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    python = fresh_venv(tmp_path)
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install",
                    "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                   check=True, capture_output=True, timeout=300, env=clean_env())
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    result = subprocess.run([str(python), str(PROBE), str(tmp_path / "site")], cwd=run_dir,
                            capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 0, result.stderr[-5000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])

    venv = python.parent.parent
    for key in ("module", "template_folder", "static_folder"):
        assert Path(seen[key]).is_relative_to(venv), f"{key} {seen[key]} is not the installed copy"
    assert set(seen["templates"]) >= tree_files(WEB / "templates")
    assert seen["signed_in"] in (302, 303)

    # 503 is a deliberate answer here (no component runs, so not ready); 500 is a failure.
    errors = {url: code for url, code in seen["pages"].items() if code == 500}
    assert errors == {}, "pages that fail on the installed appliance"
    # The consult pages, once missing from the wheel, were rendered by their own views.
    assert {"consults/index.html", "consults/room.html", "consults/join.html"} \
        <= set(seen["rendered_by_pages"])
    failed = {n: why for n, why in seen["rendered_alone"].items() if why != "ok"}
    assert failed == {}, "templates that do not render from the installed package"
    assert set(seen["rendered_by_pages"]) | set(seen["rendered_alone"]) \
        >= {t for t in seen["templates"] if t.endswith(".html")}

    assert seen["static"], "no template names a static file: the scan is broken"
    assert {f: c for f, c in seen["static"].items() if c != 200} == {}
    assert set(seen["static"]) <= tree_files(WEB / "static")
