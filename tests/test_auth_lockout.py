"""Lock-anyone-out attacks: guessing at a known name (``admin``) must lock out only the guesser.

The attacks run with the app's fake clock (``app.config["CLOCK"]``), so an hour of
hammering takes a second; the last test runs the real ``appliance web`` (gunicorn) and
the real ``appliance user unlock`` with the attacker and the admin on two loopback
addresses.
"""

from __future__ import annotations

import http.client
import re
import ssl
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from test_auth import HTML, PASSWORD, AuthApp, csrf_of, make_auth_app, post_login

from appliance.accounts import users as accounts

ATTACKER, ADMIN_DESK, ELSEWHERE = "203.0.113.66", "10.0.0.5", "10.0.0.9"


def _admin_signs_in(a: AuthApp, address: str) -> int:
    r = post_login(a.client(address), "admin", a.admin_password)
    if r.status_code == 302:
        assert not r.headers["Location"].startswith("/login"), r.headers["Location"]
    return r.status_code


def test_one_guess_a_minute_at_admin_for_an_hour_never_locks_the_real_admin_out(tmp_path: Path):
    a = make_auth_app(tmp_path)  # the shipped limits: 5 failures lock, 10 per account, 30 per address
    attacker = a.client(ATTACKER)
    answers = []
    for minute in range(60):
        answers.append(post_login(attacker, "admin", f"guess-number-{minute}").status_code)
        if minute % 10 == 9:  # the real admin, from a desk that never signed in before
            assert _admin_signs_in(a, f"10.0.1.{minute}") == 302, f"locked out at {minute} min"
        a.clock.advance(60)
    assert _admin_signs_in(a, ELSEWHERE) == 302
    # The attacker locked only itself out: at most 5 guesses in any 15 minutes, else 423.
    assert answers[:6] == [401] * 5 + [423] and answers.count(401) <= 5 * 4


def test_a_flood_from_one_address_spends_none_of_the_accounts_budget(tmp_path: Path):
    a = make_auth_app(tmp_path)
    attacker = a.client(ATTACKER)
    answers = [post_login(attacker, "admin", f"flood-{i}").status_code for i in range(80)]
    assert answers[:5] == [401] * 5 and set(answers[5:]) <= {423, 429} and answers[-1] == 429
    assert _admin_signs_in(a, ELSEWHERE) == 302  # a desk never seen before
    assert post_login(attacker, "admin", a.admin_password).status_code == 429


def test_a_blocked_address_cannot_lock_an_account_it_never_guessed_before(tmp_path: Path):
    a = make_auth_app(tmp_path, lambda t: t.replace("attempts_per_address: 30",
                                                    "attempts_per_address: 4"))
    a.add_user("staff1", "site_staff")
    attacker = a.client(ATTACKER)
    for i in range(4):  # over its own limit on other names
        post_login(attacker, f"user{i}", "guess-guess-guess")
    for _ in range(20):  # now at staff1: refused unchecked, counted for nobody but itself
        assert post_login(attacker, "staff1", "guess-guess-guess").status_code == 429
    assert post_login(a.client(ELSEWHERE), "staff1", PASSWORD).status_code == 302


def test_guesses_spread_over_many_addresses_still_hit_the_accounts_budget(tmp_path: Path):
    a = make_auth_app(tmp_path, lambda t: t.replace("attempts_per_account: 10",
                                                    "attempts_per_account: 3"))
    a.add_user("staff1", "site_staff")
    assert post_login(a.client(ADMIN_DESK), "staff1", PASSWORD).status_code == 302
    for i in range(3):
        assert post_login(a.client(f"198.51.100.{i}"), "staff1", "guess-guess").status_code \
            in (401, 429)
    assert post_login(a.client("198.51.100.99"), "staff1", PASSWORD).status_code == 429
    # where staff1 signed in before is not held back by what strangers spent
    assert post_login(a.client(ADMIN_DESK), "staff1", PASSWORD).status_code == 302


def _lock_admin_for(a: AuthApp, address: str) -> None:
    c = a.client(address)
    for i in range(5):
        assert post_login(c, "admin", f"wrong-{i}-password").status_code == 401
    assert post_login(c, "admin", a.admin_password).status_code in (423, 429)


def test_reset_password_lifts_the_lockout_and_the_budget(tmp_path: Path):
    a = make_auth_app(tmp_path)
    _lock_admin_for(a, ADMIN_DESK)
    _lock_admin_for(a, ATTACKER)  # 10 checked in 10 minutes: the account's budget is spent
    assert _admin_signs_in(a, ELSEWHERE) == 429
    conn = a.db()
    accounts.reset_password(conn, "admin", "a-brand-new-password")
    conn.close()
    for address in (ADMIN_DESK, ELSEWHERE):
        assert post_login(a.client(address), "admin", "a-brand-new-password").status_code == 302


def test_admin_users_page_shows_the_lockout_and_unlock_lifts_it(tmp_path: Path):
    a = make_auth_app(tmp_path)
    a.add_user("boss", "admin")
    a.add_user("staff1", "site_staff")
    c = a.client(ADMIN_DESK)
    post_login(c, "boss", PASSWORD)
    for i in range(5):
        post_login(a.client(ATTACKER), "staff1", f"wrong-{i}-password")
    assert post_login(a.client(ATTACKER), "staff1", PASSWORD).status_code == 423
    page = c.get("/admin/users", headers=HTML).get_data(as_text=True)
    row = re.search(r"<tr>\s*<td>staff1</td>.*?</tr>", page, re.S).group(0)
    assert f"locked for {ATTACKER}" in row and "/admin/users/staff1/unlock" in row
    token = csrf_of(c, "/admin/users")
    assert c.post("/admin/users/staff1/unlock", headers=HTML).status_code == 400  # no CSRF token
    r = c.post("/admin/users/staff1/unlock", data={"csrf_token": token}, headers=HTML)
    assert r.status_code == 302
    assert c.post("/admin/users/ghost/unlock", data={"csrf_token": token},
                  headers=HTML).status_code == 404
    assert post_login(a.client(ATTACKER), "staff1", PASSWORD).status_code == 302
    conn = a.db()
    audited = conn.execute("SELECT actor, detail FROM audit WHERE action = 'user.unlock'"
                           " AND object = 'staff1'").fetchall()
    conn.close()
    assert len(audited) == 1 and audited[0]["actor"] == "boss" and ATTACKER in audited[0]["detail"]


# -- the real thing: gunicorn, two loopback addresses, the CLI ------------------------------
class Browser:
    """A cookie-keeping HTTPS client bound to one source address (no proxy, no retries)."""

    def __init__(self, port: int, source: str):
        self.port, self.source, self.cookies = port, source, SimpleCookie()
        self.ctx = ssl.create_default_context()
        self.ctx.check_hostname, self.ctx.verify_mode = False, ssl.CERT_NONE

    def request(self, method: str, path: str, form: dict | None = None):
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx,
                                           source_address=(self.source, 0), timeout=30)
        headers = {"Accept": "text/html"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={m.value}" for k, m in self.cookies.items())
        body = urlencode(form) if form is not None else None
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            text = resp.read().decode()
        finally:
            conn.close()
        for cookie in resp.headers.get_all("Set-Cookie") or []:
            self.cookies.load(cookie)
        return resp.status, text

    def sign_in(self, username: str, password: str) -> int:
        _, page = self.request("GET", "/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        status, _ = self.request("POST", "/login", {"username": username, "password": password,
                                                    "csrf_token": token, "next": "/"})
        return status


def test_gunicorn_guessing_from_one_address_and_appliance_user_unlock(site):
    site.start("web", wait_port=site.web_port)
    attacker = [Browser(site.web_port, "127.0.0.66") for _ in range(7)]
    assert [b.sign_in("admin", f"guess-{i}-password") for i, b in enumerate(attacker[:5])] \
        == [401] * 5
    assert attacker[5].sign_in("admin", site.admin_password) == 423
    assert Browser(site.web_port, "127.0.0.5").sign_in("admin", site.admin_password) == 302
    r = site.cli("user", "unlock", "admin")
    assert r.returncode == 0, r.stderr
    assert "lifted the lockout for 127.0.0.66" in r.stdout
    assert attacker[6].sign_in("admin", site.admin_password) == 302
    r = site.cli("user", "unlock", "nobody")
    assert r.returncode == 1 and "no user named 'nobody'" in r.stderr
    conn = site.db()
    assert conn.execute("SELECT count(*) FROM audit WHERE action = 'user.unlock'").fetchone()[0] \
        == 1
    conn.close()
