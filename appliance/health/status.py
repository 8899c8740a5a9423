"""``appliance status``: each component up or down, what is stored, free disk."""

from __future__ import annotations

import socket
import time
from typing import Any

from appliance.core import components, config, db, durable
from dicom_node import index as dicom_index


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def collect(cfg: config.Config) -> dict[str, Any]:
    conn = db.connect(cfg.db_path)
    try:
        comps = components.read(conn)
        counts = dicom_index.counts(conn)
    finally:
        conn.close()
    ports = {"dicom": cfg["dicom"]["port"], "web": cfg["web"]["port"]}
    out: dict[str, Any] = {"site": cfg["site"]["name"], "components": {}}
    optional = [n for n in components.OPTIONAL_NAMES if n in comps]
    for name in (*components.NAMES, *optional):
        info = comps.get(name, {})
        up = bool(info.get("up"))
        if name in ports:
            up = up and _listening(ports[name])
        out["components"][name] = {
            "up": up, "pid": info.get("pid"), "heartbeat_age_s": info.get("heartbeat_age_s"),
            **({"port": ports[name]} if name in ports else {}),
        }
    free = durable.free_mb(cfg.data_dir)
    out.update(
        studies=counts["studies"], instances=counts["instances"], stored_bytes=counts["bytes"],
        free_disk_mb=round(free), low_water_mb=cfg["dicom"]["low_water_mb"],
        checked_at=time.time(),
    )
    out["healthy"] = all(c["up"] for c in out["components"].values()) and \
        free >= cfg["dicom"]["low_water_mb"]
    return out


def render(report: dict[str, Any]) -> str:
    lines = [f"site: {report['site']}"]
    for name, c in report["components"].items():
        state = "up" if c["up"] else "DOWN"
        extra = f" port {c['port']}" if "port" in c else ""
        pid = f" pid {c['pid']}" if c.get("pid") and c["up"] else ""
        lines.append(f"  {name:<7} {state}{extra}{pid}")
    lines.append(f"studies: {report['studies']}   instances: {report['instances']}   "
                 f"stored: {report['stored_bytes'] / 1e6:.1f} MB")
    low = "  (BELOW RESERVE)" if report["free_disk_mb"] < report["low_water_mb"] else ""
    lines.append(f"free disk: {report['free_disk_mb']} MiB (reserve {report['low_water_mb']} MiB){low}")
    return "\n".join(lines)
