"""Contact points set where users expect them: `appliance user modify NAME --email --phone`
(subprocesses) and the user's own page /notify/contacts, each verified by the code mailed to
the address, against a real SMTP server on loopback. Bad input changes nothing."""

from __future__ import annotations

import re

import pytest
from conftest import run_cli
from notify_site import SmtpServer
from test_auth import HTML, PASSWORD, csrf_of, make_auth_app, post_login

from appliance.notify import contacts


@pytest.fixture
def smtp():
    server = SmtpServer()
    yield server
    server.stop()


def _app(tmp_path, smtp):
    return make_auth_app(tmp_path, yaml_edit=lambda t: t + (
        f"\nnotify:\n  health_alerts: false\n  smtp_host: 127.0.0.1\n  smtp_port: {smtp.port}\n"
        "  smtp_security: none\n"))


def _code(smtp, address: str) -> str:
    body = smtp.box.to(address)[-1].get_payload(decode=True).decode()
    return re.search(r"Your code: (\d{6})", body).group(1)


def _points(a, username: str) -> list[dict]:
    conn = a.db()
    try:
        return contacts.listing(conn, username)
    finally:
        conn.close()


def _audit(a, action: str) -> list[tuple[str, str]]:
    """(actor, object) of each audit row of ``action``."""
    conn = a.db()
    try:
        return [tuple(r) for r in conn.execute(
            "SELECT actor, object FROM audit WHERE action = ?", (action,))]
    finally:
        conn.close()


def test_user_modify_sets_email_and_phone_verified_by_code(tmp_path, smtp):
    a = _app(tmp_path, smtp)
    a.add_user("dr.ray", "radiologist")
    d = str(a.data_dir)
    r = run_cli("user", "modify", "--data-dir", d, "dr.ray", "--email", "ray@hospital.example",
                "--phone", "0712")  # the phone is bad: neither is stored, nothing is sent
    assert r.returncode != 0 and "international form" in r.stderr, r.stderr
    assert _points(a, "dr.ray") == [] and smtp.box.to("ray@hospital.example") == []
    r = run_cli("user", "modify", "--data-dir", d, "nobody", "--email", "x@hospital.example")
    assert r.returncode != 0 and "nobody" in r.stderr
    r = run_cli("user", "modify", "--data-dir", d, "dr.ray", "--email", "ray@hospital.example",
                "--phone", "+254700000001", "--display-name", "Dr Ray")
    assert r.returncode == 0, r.stderr
    assert "email ray@hospital.example: code sent" in r.stdout and "display_name" in r.stdout
    assert "sms +254700000001: code waiting in the outbox" in r.stdout  # no modem configured
    points = {p["channel"]: p for p in _points(a, "dr.ray")}
    assert points["email"]["address"] == "ray@hospital.example"
    assert points["sms"]["address"] == "+254700000001"
    assert all(p["verified_at"] is None for p in points.values())
    r = run_cli("notify", "verify", "--data-dir", d, "dr.ray", "--channel", "email",
                _code(smtp, "ray@hospital.example"))
    assert r.returncode == 0, r.stderr
    conn = a.db()
    try:
        assert contacts.verified(conn, "dr.ray") == [("email", "ray@hospital.example")]
    finally:
        conn.close()
    assert [obj for _, obj in _audit(a, "notify.contact")] == ["dr.ray", "dr.ray"]


def test_account_page_sets_and_verifies_the_users_own_contact_point(tmp_path, smtp):
    a = _app(tmp_path, smtp)
    a.add_user("nurse", "site_staff")
    a.add_user("clerk", "site_staff")
    c = a.client()
    assert post_login(c, "nurse", PASSWORD).status_code == 302
    page = c.get("/notify/contacts", headers=HTML)
    assert page.status_code == 200 and "None yet" in page.get_data(as_text=True)
    assert 'href="/notify/contacts"' in c.get("/", headers=HTML, follow_redirects=True) \
        .get_data(as_text=True)  # in the navigation
    r = c.post("/notify/contacts", headers=HTML, data={
        "email": "not-an-address", "csrf_token": csrf_of(c, "/notify/contacts")})
    assert r.status_code == 400 and "not an email address" in r.get_data(as_text=True)
    assert _points(a, "nurse") == []
    r = c.post("/notify/contacts", headers=HTML, data={
        "email": "nurse@hospital.example", "csrf_token": csrf_of(c, "/notify/contacts")})
    text = r.get_data(as_text=True)
    assert r.status_code == 200 and "code sent" in text and "waiting for its code" in text
    code = _code(smtp, "nurse@hospital.example")
    wrong = "000000" if code != "000000" else "111111"
    r = c.post("/notify/contacts/verify", headers=HTML, data={
        "channel": "email", "code": wrong, "csrf_token": csrf_of(c, "/notify/contacts")})
    assert r.status_code == 400 and "wrong code" in r.get_data(as_text=True)
    assert _points(a, "nurse")[0]["verified_at"] is None
    r = c.post("/notify/contacts/verify", headers=HTML, data={
        "channel": "email", "code": code})  # no CSRF token: refused, nothing verified
    assert r.status_code in (400, 403) and _points(a, "nurse")[0]["verified_at"] is None
    r = c.post("/notify/contacts/verify", headers=HTML, data={
        "channel": "email", "code": code, "csrf_token": csrf_of(c, "/notify/contacts")})
    assert r.status_code == 200 and "verified" in r.get_data(as_text=True)
    assert _points(a, "nurse")[0]["verified_at"] is not None
    assert _points(a, "clerk") == []  # one's own contact points only
    other = a.client()
    assert post_login(other, "clerk", PASSWORD).status_code == 302
    assert "nurse@hospital.example" not in other.get("/notify/contacts", headers=HTML) \
        .get_data(as_text=True)
    assert ("nurse", "nurse") in _audit(a, "notify.contact")
    assert ("nurse", "nurse") in _audit(a, "notify.contact_verified")
