"""Set-up shared by the report tests: a study in the index, readers and site staff, the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dicom_data import write_series

from appliance.accounts import users as accounts
from appliance.core import config, db
from appliance.setup import site as site_init
from dicom_node.study_store import StudyStore

PASSWORD = "correct-horse-battery"


def ingest_study(site, count: int = 3, **kwargs) -> str:
    """Store a generated series through the real study store; return its StudyInstanceUID."""
    out = Path(site.data_dir) / "incoming"
    study_uid, _series, paths = write_series(out, count, **kwargs)
    store = StudyStore(site.data_dir / "studies", site.data_dir / "appliance.db")
    for path in paths:
        result = store.store(path.read_bytes(), calling_ae="CT1", remote_addr="127.0.0.1")
        assert result.outcome in ("ok", "duplicate"), result.comment
    return study_uid


def add_users(site) -> None:
    """dr.ray (radiologist), dr.lee (second radiologist), nurse.kim and nurse.ali (site staff)."""
    conn = db.open_db(site.data_dir / "appliance.db")
    try:
        for name, role, display in (("dr.ray", "radiologist", "Dr Ray Osei"),
                                    ("dr.lee", "radiologist", "Dr Lee Chen"),
                                    ("nurse.kim", "site_staff", "Kim Park"),
                                    ("nurse.ali", "site_staff", "Ali Haddad"),
                                    ("resp.jo", "responder", "Jo Responder")):
            accounts.add_user(conn, name, role, PASSWORD, display_name=display)
    finally:
        conn.close()


def site_config(site) -> config.Config:
    return config.load(site.data_dir)


def set_reports_config(site, **values) -> config.Config:
    """Rewrite keys of the reports: section of appliance.yaml (as a responder would)."""
    path = Path(site.data_dir) / "appliance.yaml"
    text = path.read_text()
    for key, value in values.items():
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.startswith(f"  {key}:") and "reports:" in "\n".join(lines[:i]):
                lines[i] = f"  {key}: {value}"
        text = "\n".join(lines) + "\n"
    path.write_text(text)
    return config.load(site.data_dir)


@dataclass
class LocalSite:
    """A data directory made in-process (no subprocess, no running components): fast set-up."""

    data_dir: Path


def local_site(base: Path) -> LocalSite:
    result = site_init.init_data_dir(base / "site", site_name="Report Test Site")
    path = result.data_dir / config.CONFIG_NAME
    path.write_text(path.read_text().replace("low_water_mb: 500", "low_water_mb: 0"))
    return LocalSite(result.data_dir)


def add_known_ae(site, name: str, host: str, port: int) -> None:
    """What ``appliance ae add NAME --host H --port P`` does, in-process."""
    from ruamel.yaml.comments import CommentedMap

    config.edit_known_aes(site.data_dir, lambda items: items.append(
        CommentedMap({"name": name, "host": host, "port": port})))
