"""Helpers of the notify tests: a real SMTP server on loopback (aiosmtpd), a site with readers
whose contact points are verified, and a STAT CT head study with a known patient."""

from __future__ import annotations

import subprocess
import threading
import time
from email import message_from_bytes
from email.message import Message
from pathlib import Path

from conftest import free_port, require_module, require_tool

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
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.controller.stop()
            self.running = False

    def start(self) -> None:
        from aiosmtpd.controller import Controller

        self.controller = Controller(self.box, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        self.running = True


def notify_yaml(smtp_port: int, sms_spool: str = "", extra: str = "") -> str:
    lines = ["notify:", "  health_alerts: false", "  smtp_host: 127.0.0.1", f"  smtp_port: {smtp_port}",
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


class GammuSmsd:
    """Debian's gammu-smsd with gammu's dummy phone (a directory) and the FILES backend.

    ``spool`` is what ``notify.sms_spool`` names (outbox/, sent/, error/, inbox/); a phone's
    reply is an SMS backup file dropped into the dummy phone's folder, which gammu-smsd
    receives into ``inbox/`` as it would from a modem.
    """

    def __init__(self, base: Path):
        self.binary = require_tool("gammu-smsd")
        self.spool, self.phone = base / "sms", base / "dummy-phone"
        for d in ("outbox", "sent", "error", "inbox"):
            (self.spool / d).mkdir(parents=True)
        for folder in range(1, 6):
            (self.phone / "sms" / str(folder)).mkdir(parents=True)
        self.config = base / "smsdrc"
        self.config.write_text(
            f"[gammu]\nmodel = dummy\nconnection = none\nport = {self.phone}\n"
            "gammuloc = /dev/null\n\n[smsd]\nservice = files\n"
            f"logfile = {base / 'smsd.log'}\ndebuglevel = 1\ncommtimeout = 1\n"
            "receivefrequency = 1\nloopsleep = 1\nstatusfrequency = 0\nchecksecurity = 0\n"
            "checkbattery = 0\nchecksignal = 0\ntransmitformat = auto\n"
            + "".join(f"{k}path = {self.spool / d}/\n" for k, d in (
                ("inbox", "inbox"), ("outbox", "outbox"), ("sentsms", "sent"),
                ("errorsms", "error"))))
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._replies = 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def wait_files(self, folder: str, n: int, timeout: float = 20.0) -> list[Path]:
        """Until ``folder`` holds at least ``n`` message files (gammu-smsd works each second)."""
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(p for p in (self.spool / folder).glob("*.txt"))
            if len(files) >= n:
                return files
            assert self.proc.poll() is None, "gammu-smsd exited"
            assert time.monotonic() < deadline, f"{folder}/ has {len(files)} of {n} messages"
            time.sleep(0.1)

    def reply(self, number: str, text: str) -> None:
        """A text from ``number`` reaching the modem (the dummy phone's inbox folder)."""
        self._replies += 1
        hexed = text.encode("utf-16-be").hex().upper()
        (self.phone / "sms" / "1" / str(100 + self._replies)).write_text(
            f'[SMSBackup000]\nNumber = "{number}"\nCoding = Default\nFolder = 1\n'
            f"Sent = 20261207T210000\nState = UnRead\nPDU = Deliver\nText00 = {hexed}\n")
