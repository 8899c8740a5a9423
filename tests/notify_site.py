"""Helpers of the notify tests: a real SMTP server on loopback (aiosmtpd), a site with readers
whose contact points are verified, and a STAT CT head study with a known patient."""

from __future__ import annotations

import threading
from email import message_from_bytes
from email.message import Message

from conftest import free_port, require_module

from appliance.core import config, db
from appliance.notify import contacts, outbox
from appliance.reading import read_queue

PATIENT_NAME, PATIENT_ID = "MOYO^TANDI", "P-4471"


class Mailbox:
    """An aiosmtpd handler that keeps every message it accepts (and can refuse them all)."""

    def __init__(self):
        self.messages: list[Message] = []
        self.raw: list[bytes] = []
        self.refuse = False
        self.arrived = threading.Event()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        if self.refuse:
            return "451 try again later"
        self.raw.append(envelope.content)
        self.messages.append(message_from_bytes(envelope.content))
        self.arrived.set()
        return "250 OK"

    def to(self, address: str) -> list[Message]:
        return [m for m in self.messages if m["To"] == address]


class SmtpServer:
    """aiosmtpd's Controller on a free loopback port; stop() makes the port refuse."""

    def __init__(self):
        require_module("aiosmtpd")
        from aiosmtpd.controller import Controller

        self.box = Mailbox()
        self.port = free_port()
        self.controller = Controller(self.box, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()

    def start(self) -> None:
        from aiosmtpd.controller import Controller

        self.controller = Controller(self.box, hostname="127.0.0.1", port=self.port)
        self.controller.start()


def notify_yaml(smtp_port: int, sms_spool: str = "", extra: str = "") -> str:
    lines = ["notify:", "  smtp_host: 127.0.0.1", f"  smtp_port: {smtp_port}",
             "  smtp_security: none", "  smtp_from: pager@field.example"]
    if sms_spool:
        lines.append(f"  sms_spool: {sms_spool}")
    return "\n" + "\n".join(lines) + "\n" + extra


def add_contact(conn, username: str, channel: str, address: str, now: float) -> None:
    code = contacts.set_contact(conn, username, channel, address, now)
    contacts.verify(conn, username, channel, code, now)


def first_received(conn, study_uid: str) -> float:
    return float(conn.execute("SELECT first_received FROM studies WHERE study_uid = ?",
                              (study_uid,)).fetchone()[0])


def sweep_all(data_dir, now: float) -> dict:
    """One worker pass at ``now``: the read queue, then the notify outbox."""
    cfg = config.load(data_dir)
    conn = db.connect(cfg.db_path)
    try:
        read_queue.run_once(conn, cfg.workflows_dir, now, 30.0)
        return outbox.run_once(conn, cfg, now, clock=lambda: now)
    finally:
        conn.close()
