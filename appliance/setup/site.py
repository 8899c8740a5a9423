"""Creating a site's data directory: what ``appliance init`` does.

Everything is created in a staging directory beside the target and renamed
into place at the end, so an interrupted init never leaves a half-made site
that a later start would take for a real one.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from appliance.accounts import users as accounts
from appliance.core import audit, config, db, durable, identity

SUBDIRS = ("workflows", "studies", "bundles", "keys", "tls", "logs", "run")


class InitError(Exception):
    pass


@dataclass
class InitResult:
    data_dir: Path
    admin_password: str
    key_id: str
    replaced: Path | None = None


def slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s[:40] or "site"


def init_data_dir(
    data_dir: Path, site_name: str = "Field site", ae_title: str = "FIELDAPP",
    dicom_port: int = 11112, web_port: int = 8443, force: bool = False,
) -> InitResult:
    """Create a complete data directory; refuse an existing one unless ``force``."""
    data_dir = Path(data_dir).resolve()
    if data_dir.exists() and any(data_dir.iterdir()) and not force:
        raise InitError(f"{data_dir} exists and is not empty (use --force to re-initialise)")
    text = config.render_default(site_name, slug(site_name), ae_title, dicom_port, web_port)
    config.parse(text, data_dir / config.CONFIG_NAME)  # our own template must validate
    staging = data_dir.with_name(f".{data_dir.name}.init-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    replaced = None
    durable.ensure_dir(staging)
    os.chmod(staging, 0o700)
    try:
        for sub in SUBDIRS:
            (staging / sub).mkdir()
        os.chmod(staging / "keys", 0o700)
        os.chmod(staging / "tls", 0o700)
        durable.atomic_write(staging / config.CONFIG_NAME, text.encode(), mode=0o600)
        _install_default_workflows(staging / "workflows")
        key_id = identity.create_signing_key(staging / "keys")
        identity.create_tls(staging / "tls", site_name)
        password = accounts.generate_password()
        conn = db.open_db(staging / "appliance.db")
        try:
            with db.transaction(conn):
                accounts.add_user(conn, "admin", "admin", password, "Administrator",
                                  must_change=True)
                audit.record(conn, "system", "site.init", site_name,
                             detail={"ae_title": ae_title, "dicom_port": dicom_port,
                                     "web_port": web_port, "key_id": key_id})
        finally:
            conn.close()
        os.chmod(staging / "appliance.db", 0o600)
        if data_dir.exists():
            # --force never deletes patient data: the old directory is kept beside it.
            old = data_dir.with_name(f"{data_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            data_dir.rename(old)
            staging.rename(data_dir)
            replaced = old
        else:
            durable.ensure_dir(data_dir.parent)
            staging.rename(data_dir)
        durable.fsync_dir(data_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return InitResult(data_dir, password, key_id, replaced)


def _install_default_workflows(target: Path) -> None:
    """Copy the shipped default workflow (if the workflows package ships one)."""
    try:
        src = resources.files("workflows") / "library" / "disaster-default.yaml"
        if src.is_file():
            durable.atomic_write(target / "disaster-default.yaml", src.read_bytes(), mode=0o644)
    except (FileNotFoundError, ModuleNotFoundError):
        pass
