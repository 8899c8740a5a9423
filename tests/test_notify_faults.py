"""Faults: the SMTP server down for 3 minutes (fake clock) → the message goes by SMS after 2
minutes and the mail is still delivered once when the server returns; a worker killed with -9
while sending, three times → each message exactly once per channel, counted at the receivers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import ROOT
from notify_site import SmtpServer, add_contact, sweep_all
from test_auth import make_auth_app
from test_notify_webhook import SECRET, Receiver

from appliance.core import notifications
from appliance.notify import channels


@pytest.fixture
def smtp():
    server = SmtpServer()
    yield server
    server.stop()


def test_smtp_down_three_minutes_sms_after_two_and_the_mail_once_when_back(tmp_path, smtp):
    spool = tmp_path / "sms"
    for d in ("outbox", "sent", "error", "inbox"):
        (spool / d).mkdir(parents=True)
    a = make_auth_app(tmp_path, yaml_edit=lambda t: t + (
        f"\nnotify:\n  health_alerts: false\n  smtp_host: 127.0.0.1\n  smtp_port: {smtp.port}\n  smtp_security: none\n"
        f"  sms_spool: {spool}\n"))
    a.add_user("dr.ray", "radiologist")
    t = a.clock()
    conn = a.db()
    add_contact(conn, "dr.ray", "email", "ray@hospital.example", t)
    add_contact(conn, "dr.ray", "sms", "+254700000001", t)
    smtp.stop()  # the mail server goes down
    notifications.notify(conn, ["dr.ray"], "test", "Test page", "A test.", now=t)
    conn.close()
    sms = lambda: list((spool / "outbox").glob("OUT*.txt"))  # noqa: E731
    for dt in (0, 30, 60, 90, 119):
        assert sweep_all(a.data_dir, t + dt)["sent"] == 0
    assert sms() == []  # not before 2 minutes
    assert sweep_all(a.data_dir, t + 121)["sent"] == 1
    assert len(sms()) == 1 and "Test page" in sms()[0].read_text()
    smtp.start()  # back after 3 minutes
    sent = sum(sweep_all(a.data_dir, t + dt)["sent"] for dt in range(180, 900, 15))
    assert sent == 1 and len(smtp.box.messages) == 1
    assert smtp.box.messages[0]["To"] == "ray@hospital.example"
    assert sum(sweep_all(a.data_dir, t + dt)["sent"] for dt in (1000, 2000)) == 0
    assert len(sms()) == 1 and len(smtp.box.messages) == 1


class SlowMailbox:
    """Takes each message, then waits before answering: a kill lands inside the SMTP DATA."""

    def __init__(self, box):
        self.box = box

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        result = await self.box.handle_DATA(server, session, envelope)
        await asyncio.sleep(0.15)
        return result


def test_worker_killed_while_sending_three_times_each_message_once_per_channel(tmp_path, smtp):
    from aiosmtpd.controller import Controller

    smtp.controller.stop()
    smtp.controller = Controller(SlowMailbox(smtp.box), hostname="127.0.0.1", port=smtp.port)
    smtp.controller.start()
    hook = Receiver(time.time)
    hook.delay = 0.15
    spool = tmp_path / "sms"
    for d in ("outbox", "sent", "error", "inbox"):
        (spool / d).mkdir(parents=True)
    creds = tmp_path / "creds"
    channels.write_credentials(creds, {"webhook_secret": SECRET})
    a = make_auth_app(tmp_path, yaml_edit=lambda t: t + (
        f"\nnotify:\n  health_alerts: false\n  smtp_host: 127.0.0.1\n  smtp_port: {smtp.port}\n  smtp_security: none\n"
        f"  sms_spool: {spool}\n  webhook_url: http://127.0.0.1:{hook.port}/hook\n"
        f"  credentials_file: {creds}\n"))
    a.add_user("dr.mail", "radiologist")
    a.add_user("dr.phone", "radiologist")
    conn = a.db()
    now = time.time()
    add_contact(conn, "dr.mail", "email", "mail@hospital.example", now)
    add_contact(conn, "dr.phone", "sms", "+254700000009", now)
    for i in range(6):
        notifications.notify(conn, ["dr.mail", "dr.phone"], "test", f"Page {i}", now=now)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    cmd = [sys.executable, str(ROOT / "tests" / "notify_worker_loop.py"), str(a.data_dir)]
    try:
        for _ in range(3):
            before = _handed(conn)
            worker = subprocess.Popen(cmd, env=env, start_new_session=True)
            deadline = time.monotonic() + 30
            while _handed(conn) <= before:  # a message in the provider's hands right now
                assert time.monotonic() < deadline and worker.poll() is None
                time.sleep(0.005)
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()
        worker = subprocess.Popen(cmd, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while conn.execute("SELECT COUNT(*) FROM notify_outbox WHERE state IN"
                           " ('pending', 'sending')").fetchone()[0]:
            assert time.monotonic() < deadline, "the outbox did not drain"
            time.sleep(0.05)
        worker.kill()
        worker.wait()
    finally:
        hook.server.shutdown()
    mail_ids = Counter(m["Message-ID"] for m in smtp.box.messages)
    assert len(mail_ids) == 6 and set(mail_ids.values()) == {1}
    sms_keys = Counter(p.name.rsplit("_", 1)[1] for p in (spool / "outbox").glob("OUT*.txt"))
    assert len(sms_keys) == 6 and set(sms_keys.values()) == {1}
    # One webhook post per notification (not per user it went to), each accepted once.
    assert len(hook.accepted) == 6 and len({h["X-Appliance-Idempotency-Key"]
                                            for h, _ in hook.accepted}) == 6
    states = Counter(r[0] for r in conn.execute("SELECT state FROM notify_outbox"))
    conn.close()
    assert states == {"sent": 18}


def _handed(conn) -> int:
    """Rows ever handed to a provider (attempts under the 'handed' mark, summed)."""
    return conn.execute("SELECT COALESCE(SUM(attempts), 0) FROM notify_outbox"
                        " WHERE phase = 'handed'").fetchone()[0]
