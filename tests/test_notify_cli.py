"""`appliance notify contact|verify|test|status` as a responder runs them (subprocesses),
against a real SMTP server on loopback; /metrics counts notifications by channel and outcome."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli
from notify_site import SmtpServer
from test_auth import make_auth_app


@pytest.fixture
def smtp():
    server = SmtpServer()
    yield server
    server.stop()


def test_contact_is_verified_by_its_code_then_test_and_status(tmp_path, smtp):
    a = make_auth_app(tmp_path, yaml_edit=lambda t: t + (
        f"\nnotify:\n  health_alerts: false\n  smtp_host: 127.0.0.1\n  smtp_port: {smtp.port}\n  smtp_security: none\n"))
    a.add_user("dr.ray", "radiologist")
    d = str(a.data_dir)
    r = run_cli("notify", "test", "--data-dir", d, "--user", "dr.ray")
    assert r.returncode != 0 and "no verified contact point" in r.stderr
    r = run_cli("notify", "contact", "--data-dir", d, "dr.ray", "--email", "not-an-address")
    assert r.returncode != 0 and "not an email address" in r.stderr
    r = run_cli("notify", "contact", "--data-dir", d, "dr.ray", "--email", "ray@hospital.example")
    assert r.returncode == 0 and "code sent" in r.stdout, r.stderr
    code_mail = smtp.box.to("ray@hospital.example")[0].get_payload(decode=True).decode()
    code = re.search(r"Your code: (\d{6})", code_mail).group(1)
    r = run_cli("notify", "verify", "--data-dir", d, "dr.ray", "--channel", "email", "000000"
                if code != "000000" else "111111")
    assert r.returncode != 0 and "wrong code" in r.stderr
    r = run_cli("notify", "verify", "--data-dir", d, "dr.ray", "--channel", "email", code)
    assert r.returncode == 0, r.stderr
    r = run_cli("notify", "test", "--data-dir", d, "--user", "dr.ray", "--channel", "email")
    assert r.returncode == 0 and "email" in r.stdout and "sent" in r.stdout, r.stderr
    assert len(smtp.box.to("ray@hospital.example")) == 2
    smtp.stop()
    r = run_cli("notify", "test", "--data-dir", d, "--user", "dr.ray")
    assert r.returncode == 1 and "pending" in r.stdout  # waits in the outbox for a retry
    r = run_cli("notify", "status", "--data-dir", d, "--json")
    st = json.loads(r.stdout)
    assert st["channels"]["email"]["configured"] and st["channels"]["email"]["last_success"]
    assert st["channels"]["email"]["last_failure"] and "Connection" in \
        st["channels"]["email"]["last_error"]
    assert st["outbox"] == {"sent": 2, "pending": 1}
    r = run_cli("notify", "status", "--data-dir", d)
    assert "email    configured" in r.stdout and "pending 1" in r.stdout
