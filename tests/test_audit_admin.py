"""The admin pages: audit trail with filters and chain check, break-glass list, users."""

from __future__ import annotations

import re
import sqlite3

import pytest
from test_auth import HTML, AuthApp, csrf_of, login, make_auth_app


@pytest.fixture
def site_app(tmp_path) -> AuthApp:
    return make_auth_app(tmp_path)


def _admin(a: AuthApp):
    a.add_user("boss", "admin", display_name="Site Admin")
    c = a.client("10.9.9.9")
    login(a, c, "boss")
    return c


def _table_rows(html: str) -> list[str]:
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return re.findall(r"<tr>(.*?)</tr>", body, flags=re.S)


def test_audit_trail_filters_and_chain_check(site_app: AuthApp):
    site_app.add_user("rad1", "radiologist")
    rad = site_app.client("10.0.0.5")
    login(site_app, rad, "rad1")
    c = _admin(site_app)
    html = c.get("/admin/audit?actor=rad1", headers=HTML).get_data(as_text=True)
    rows = _table_rows(html)
    assert rows and all("<td>rad1</td>" in r for r in rows)
    assert any("auth.totp.enrol" in r for r in rows)
    html = c.get("/admin/audit?action=auth.login&outcome=ok&source=10.0.0.5",
                 headers=HTML).get_data(as_text=True)
    assert len(_table_rows(html)) == 1
    assert "audit chain intact" in c.get("/admin/audit?verify=1", headers=HTML).get_data(as_text=True)
    # Someone edits the trail behind the appliance's back: the page says which row.
    raw = sqlite3.connect(site_app.data_dir / "appliance.db", isolation_level=None)
    raw.execute("DROP TRIGGER audit_no_update")
    raw.execute("UPDATE audit SET source = '1.1.1.1' WHERE id = 2")
    raw.close()
    html = c.get("/admin/audit?verify=1", headers=HTML).get_data(as_text=True)
    assert "row 2: contents do not match its hash" in html
    # Reading the trail is itself audited.
    conn = site_app.db()
    assert conn.execute("SELECT count(*) FROM audit WHERE action='audit.view' AND actor='boss'"
                        ).fetchone()[0] >= 1
    conn.close()
    assert c.get("/admin/audit?since=yesterday", headers=HTML).status_code == 400


def test_break_glass_is_shown_to_admins(site_app: AuthApp):
    site_app.add_user("rad1", "radiologist", display_name="Dr One")
    rad = site_app.client()
    login(site_app, rad, "rad1")
    reason = "Mass casualty: all radiologists of the pool are scrubbed in"
    r = rad.post("/break-glass", data={"study": "1.2.840.5", "reason": reason,
                                       "csrf_token": csrf_of(rad, "/break-glass?study=1.2.840.5")},
                 headers=HTML)
    assert r.status_code == 302
    assert rad.get("/admin/break-glass", headers=HTML).status_code == 403
    html = _admin(site_app).get("/admin/break-glass", headers=HTML).get_data(as_text=True)
    assert reason in html and "Dr One" in html and "1.2.840.5" in html


def test_admin_disables_a_user_with_csrf_and_their_session_ends(site_app: AuthApp):
    site_app.add_user("staff1", "site_staff")
    staff = site_app.client()
    login(site_app, staff, "staff1")
    c = _admin(site_app)
    assert "staff1" in c.get("/admin/users", headers=HTML).get_data(as_text=True)
    r = c.post("/admin/users/staff1/disabled", data={"disabled": "1"}, headers=HTML)
    assert r.status_code == 400  # no CSRF token
    assert staff.get("/account/password").status_code == 200
    token = csrf_of(c, "/admin/users")
    r = c.post("/admin/users/staff1/disabled", data={"disabled": "1", "csrf_token": token},
               headers=HTML)
    assert r.status_code == 302
    assert staff.get("/account/password").status_code == 401
    r = c.post("/admin/users/boss/disabled", data={"disabled": "1", "csrf_token": token},
               headers=HTML)
    assert r.status_code == 400  # not oneself
    conn = site_app.db()
    assert conn.execute("SELECT actor FROM audit WHERE action='user.disable'").fetchone()[0] == "boss"
    conn.close()
