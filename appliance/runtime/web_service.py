"""``appliance web``: gunicorn serving the Flask app over HTTPS with the site's certificate."""

from __future__ import annotations

import logging

from gunicorn.app.base import BaseApplication

from appliance.core import components, config, db

log = logging.getLogger("appliance.web")


class _Server(BaseApplication):
    def __init__(self, cfg: config.Config, options: dict):
        self.cfg_site = cfg
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from appliance.app import create_app

        return create_app(self.cfg_site)


def run(cfg: config.Config) -> int:
    conn = db.open_db(cfg.db_path)
    conn.close()
    w = cfg["web"]
    stop_beat = components.start_heartbeat(
        lambda: db.connect(cfg.db_path), "web", detail=lambda: {"port": w["port"]})
    options = {
        "bind": f"{w['bind']}:{w['port']}",
        "workers": w["workers"],
        "worker_class": "gthread",
        "threads": 8,
        "certfile": str(cfg.tls_dir / "server.crt"),
        "keyfile": str(cfg.tls_dir / "server.key"),
        "keepalive": 75,
        "timeout": 120,
        "graceful_timeout": 5,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": cfg["logging"]["level"],
        "proc_name": "appliance-web",
        "control_socket_disable": True,  # one fixed path per user: two sites would collide
        "preload_app": False,  # open SQLite after fork, never before
    }
    try:
        _Server(cfg, options).run()
    finally:
        stop_beat.set()
    return 0
