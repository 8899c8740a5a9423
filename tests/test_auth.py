"""Sign-in flows through Flask's test client: password, lockout, rate limits, TOTP, idle
logoff, CSRF, API tokens, break-glass. A fake clock ages sessions; nothing sleeps.

Also the helpers other auth tests import (``auth_app``, ``login``, ``FakeClock``).
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass
from pathlib import Path

import pyotp
import pytest
from cryptography.exceptions import InvalidTag
from flask import Flask
from flask.testing import FlaskClient

from appliance.accounts import tokens
from appliance.accounts import users as accounts
from appliance.app import create_app
from appliance.core import config, db
from appliance.setup import site

PASSWORD = "correct-horse-battery"
HTML = {"Accept": "text/html"}


class FakeClock:
    """``app.config["CLOCK"]``: starts at a fixed time and moves only when told."""

    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class AuthApp:
    app: Flask
    clock: FakeClock
    data_dir: Path
    admin_password: str

    def client(self, address: str = "127.0.0.1") -> FlaskClient:
        c = self.app.test_client()
        c.environ_base.update({"wsgi.url_scheme": "https", "REMOTE_ADDR": address})
        return c

    def db(self):
        return db.connect(self.data_dir / "appliance.db")

    def add_user(self, username: str, role: str, password: str = PASSWORD, **kw) -> int:
        conn = self.db()
        try:
            return accounts.add_user(conn, username, role, password, **kw)
        finally:
            conn.close()

    def token(self, username: str) -> str:
        conn = self.db()
        try:
            return tokens.create_token(conn, username, now=self.clock())
        finally:
            conn.close()


def make_auth_app(base: Path, yaml_edit=None) -> AuthApp:
    """A data directory made in-process (no subprocess) and its app with a fake clock."""
    result = site.init_data_dir(base / "site", site_name="Auth Test Site")
    if yaml_edit:
        cfg_path = result.data_dir / config.CONFIG_NAME
        cfg_path.write_text(yaml_edit(cfg_path.read_text()))
    cfg = config.load(result.data_dir)
    clock = FakeClock()
    app = create_app(cfg, {"TESTING": True, "CLOCK": clock})
    return AuthApp(app, clock, result.data_dir, result.admin_password)


@pytest.fixture
def auth_app(tmp_path: Path) -> AuthApp:
    return make_auth_app(tmp_path)


def csrf_of(client: FlaskClient, path: str = "/login") -> str:
    page = client.get(path, headers=HTML).get_data(as_text=True)
    m = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert m, f"no CSRF token on {path}"
    return m.group(1)


def post_login(client: FlaskClient, username: str, password: str, next_: str = "/"):
    return client.post("/login", data={"username": username, "password": password,
                                       "csrf_token": csrf_of(client), "next": next_},
                       headers=HTML)


def totp_secret_of(a: AuthApp, username: str) -> str | None:
    """The user's enrolled TOTP key, opened with the site's key (the database holds it sealed)."""
    conn = a.db()
    try:
        row = conn.execute("SELECT id, totp_secret FROM users WHERE username=?",
                           (username,)).fetchone()
    finally:
        conn.close()
    if row["totp_secret"] is None:
        return None
    return accounts.open_totp(a.data_dir / "keys", row["totp_secret"], row["id"])


def login(a: AuthApp, client: FlaskClient, username: str, password: str = PASSWORD) -> None:
    """Sign in completely, enrolling TOTP on the way if the role needs it."""
    r = post_login(client, username, password)
    assert r.status_code == 302, r.get_data(as_text=True)
    if r.headers["Location"].startswith("/login/totp"):
        page = client.get("/login/totp", headers=HTML).get_data(as_text=True)
        secret = totp_secret_of(a, username)
        if secret is None:
            secret = re.search(r'data-testid="totp-secret">([A-Z2-7]+)<', page).group(1)
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        a.clock.advance(30)  # a fresh time step: codes are single-use
        r = client.post("/login/totp", data={"code": pyotp.TOTP(secret).at(a.clock()),
                                             "csrf_token": token}, headers=HTML)
        assert r.status_code == 302 and not r.headers["Location"].startswith("/login"), \
            r.get_data(as_text=True)


def audit_actions(a: AuthApp) -> list[tuple[str, str, str]]:
    conn = a.db()
    try:
        return [(r["actor"], r["action"], r["outcome"])
                for r in conn.execute("SELECT actor, action, outcome FROM audit ORDER BY id")]
    finally:
        conn.close()


# -- password sign-in ---------------------------------------------------------------------
def test_login_logout_and_audit(auth_app: AuthApp):
    auth_app.add_user("staff1", "site_staff")
    c = auth_app.client()
    assert c.get("/account/password", headers=HTML).status_code == 302  # not signed in
    r = post_login(c, "staff1", PASSWORD, next_="/account/password")
    assert r.status_code == 302 and r.headers["Location"] == "/account/password"
    cookie = r.headers["Set-Cookie"]
    page = c.get("/login", headers=HTML)
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-store"
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert PASSWORD not in cookie
    assert c.get("/account/password", headers=HTML).status_code == 200
    token = csrf_of(c, "/account/password")
    assert c.post("/logout", data={"csrf_token": token}).status_code == 302
    assert c.get("/account/password", headers=HTML).status_code == 302
    actions = audit_actions(auth_app)
    assert ("staff1", "auth.login", "ok") in actions
    assert ("staff1", "auth.logout", "ok") in actions


def test_wrong_password_is_refused_and_audited_without_the_password(auth_app: AuthApp):
    auth_app.add_user("staff1", "site_staff")
    c = auth_app.client()
    r = post_login(c, "staff1", "wrong-password-123")
    assert r.status_code == 401
    assert "wrong user name or password" in r.get_data(as_text=True)
    r2 = post_login(c, "nobody", "wrong-password-123")
    assert r2.status_code == 401  # same answer for an unknown user
    assert ("staff1", "auth.login", "fail") in audit_actions(auth_app)
    conn = auth_app.db()
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert "wrong-password-123" not in dump


def test_unauthenticated_api_gets_json_401_and_html_gets_redirect(auth_app: AuthApp):
    c = auth_app.client()
    r = c.get("/account/password")  # no Accept: text/html → JSON
    assert r.status_code == 401 and r.is_json and "error" in r.get_json()
    r = c.get("/account/password?x=1", headers=HTML)
    assert r.status_code == 302
    assert r.headers["Location"].startswith("/login?next=%2Faccount%2Fpassword%3Fx%3D1")


def test_open_redirect_after_login_is_refused(auth_app: AuthApp):
    auth_app.add_user("staff1", "site_staff")
    c = auth_app.client()
    r = post_login(c, "staff1", PASSWORD, next_="//evil.example/x")
    assert r.status_code == 302 and r.headers["Location"] == "/"


def test_lockout_after_repeated_failures_then_unlocks_in_time(auth_app: AuthApp):
    auth_app.add_user("staff1", "site_staff")
    c = auth_app.client()
    for _ in range(5):
        assert post_login(c, "staff1", "not-the-password").status_code == 401
    r = post_login(c, "staff1", PASSWORD)  # right password, but locked
    assert r.status_code == 423 and "locked" in r.get_data(as_text=True)
    auth_app.clock.advance(14 * 60)
    assert post_login(c, "staff1", PASSWORD).status_code == 423
    auth_app.clock.advance(2 * 60)  # 16 min after the failures: the lock has lifted
    assert post_login(c, "staff1", PASSWORD).status_code == 302


def test_unknown_usernames_lock_like_real_ones_and_are_kept_only_hashed(auth_app: AuthApp):
    c = auth_app.client()
    for _ in range(5):
        post_login(c, "My-Secret-Pass-99", "not-the-password")  # password typed as the name
    assert post_login(c, "My-Secret-Pass-99", "not-the-password").status_code == 423
    conn = auth_app.db()
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert "My-Secret-Pass-99" not in dump and "unknown:" in dump


def test_rate_limit_per_address(tmp_path: Path):
    a = make_auth_app(tmp_path, lambda t: t.replace("attempts_per_address: 30",
                                                    "attempts_per_address: 4"))
    attacker, other = a.client("10.0.0.66"), a.client("10.0.0.7")
    a.add_user("staff1", "site_staff")
    for i in range(4):  # different accounts: no lockout, but the address is throttled
        assert post_login(attacker, f"user{i}", "guess-guess-guess").status_code == 401
    assert post_login(attacker, "staff1", PASSWORD).status_code == 429
    assert post_login(other, "staff1", PASSWORD).status_code == 302  # others unaffected


def test_rate_limit_per_account(tmp_path: Path):
    a = make_auth_app(tmp_path, lambda t: t.replace("attempts_per_account: 10",
                                                    "attempts_per_account: 3"))
    a.add_user("staff1", "site_staff")
    for i in range(3):  # from different addresses, each failing once
        assert post_login(a.client(f"10.0.1.{i}"), "staff1", "guess-guess").status_code == 401
    assert post_login(a.client("10.0.1.99"), "staff1", PASSWORD).status_code == 429
    a.clock.advance(11 * 60)
    assert post_login(a.client("10.0.1.99"), "staff1", PASSWORD).status_code == 302


def test_login_form_without_csrf_token_is_refused(auth_app: AuthApp):
    auth_app.add_user("staff1", "site_staff")
    c = auth_app.client()
    r = c.post("/login", data={"username": "staff1", "password": PASSWORD}, headers=HTML)
    assert r.status_code == 400
    assert c.get("/account/password", headers=HTML).status_code == 302


def test_csrf_rejection_changes_nothing(auth_app: AuthApp):
    auth_app.add_user("staff1", "site_staff")
    c = auth_app.client()
    login(auth_app, c, "staff1")
    form = {"current": PASSWORD, "new": "another-password-1", "again": "another-password-1"}
    r = c.post("/account/password", data=form, headers=HTML)
    assert r.status_code == 400 and "CSRF" in r.get_data(as_text=True)
    r = c.post("/account/password", data={**form, "csrf_token": "forged"}, headers=HTML)
    assert r.status_code == 400
    conn = auth_app.db()
    stored = conn.execute("SELECT password_hash FROM users WHERE username='staff1'").fetchone()[0]
    conn.close()
    assert accounts.check_password(stored, PASSWORD)  # unchanged
    # The header form used by the pages' JavaScript is accepted.
    r = c.post("/account/password", data=form, headers={**HTML, "X-CSRF-Token": csrf_of(c, "/account/password")})
    assert r.status_code == 302


# -- idle logoff and session lifetime ----------------------------------------------------------
def test_idle_logoff_after_15_minutes_with_a_fake_clock(auth_app: AuthApp):
    auth_app.add_user("staff1", "site_staff")
    c = auth_app.client()
    login(auth_app, c, "staff1")
    auth_app.clock.advance(14 * 60)
    assert c.get("/account/password", headers=HTML).status_code == 200  # activity
    auth_app.clock.advance(14 * 60)
    assert c.get("/account/password", headers=HTML).status_code == 200  # 14 min idle: still in
    auth_app.clock.advance(10 * 60)
    # Background refreshes do not count as activity...
    r = c.get("/account/password", headers={**HTML, "X-Background": "1"})
    assert r.status_code == 200
    auth_app.clock.advance(6 * 60)  # ...so 16 min after the last real request: signed out
    r = c.get("/account/password", headers=HTML)
    assert r.status_code == 302 and "idle=1" in r.headers["Location"]
    assert ("staff1", "auth.logout", "ok") in audit_actions(auth_app)
    assert c.get("/account/password", headers=HTML).status_code == 302  # and it stays ended
    conn = auth_app.db()
    reasons = [r[0] for r in conn.execute("SELECT end_reason FROM sessions")]
    conn.close()
    assert reasons == ["idle"]


def test_idle_logoff_is_never_early_though_last_seen_is_written_sparingly(auth_app: AuthApp):
    """last_seen is written at most every 30 s; an action just after a write must still count."""
    auth_app.add_user("staff1", "site_staff")
    c = auth_app.client()
    login(auth_app, c, "staff1")
    auth_app.clock.advance(10)
    assert c.get("/account/password", headers=HTML).status_code == 200  # not written: < 30 s
    auth_app.clock.advance(15 * 60 - 5)  # 14:55 after that action, 15:05 after last_seen
    assert c.get("/account/password", headers=HTML).status_code == 200
    auth_app.clock.advance(15 * 60 + 31)  # past the timeout and the 30 s write interval
    r = c.get("/account/password", headers=HTML)
    assert r.status_code == 302 and "idle=1" in r.headers["Location"]


def test_idle_timeout_is_configurable(tmp_path: Path):
    a = make_auth_app(tmp_path, lambda t: t.replace("idle_timeout_min: 15", "idle_timeout_min: 2"))
    a.add_user("staff1", "site_staff")
    c = a.client()
    login(a, c, "staff1")
    a.clock.advance(3 * 60)
    assert c.get("/account/password").status_code == 401


def test_disabling_a_user_ends_their_session_at_once(auth_app: AuthApp):
    auth_app.add_user("staff1", "site_staff")
    c = auth_app.client()
    login(auth_app, c, "staff1")
    conn = auth_app.db()
    conn.execute("UPDATE users SET disabled = 1 WHERE username = 'staff1'")
    conn.close()
    assert c.get("/account/password").status_code == 401


# -- TOTP ------------------------------------------------------------------------------------------
def test_reader_must_enrol_and_confirm_totp(auth_app: AuthApp):
    auth_app.add_user("rad1", "radiologist")
    c = auth_app.client()
    r = post_login(c, "rad1", PASSWORD)
    assert r.headers["Location"].startswith("/login/totp")
    # Password alone opens nothing: API → 401, pages → the TOTP step.
    assert c.get("/account/password").status_code == 401
    r = c.get("/account/password", headers=HTML)
    assert r.status_code == 302 and r.headers["Location"].startswith("/login/totp")
    page = c.get("/login/totp", headers=HTML).get_data(as_text=True)
    secret = re.search(r'data-testid="totp-secret">([A-Z2-7]+)<', page).group(1)
    assert 'data-testid="totp-qr"' in page and 'src="data:image/svg+xml' in page
    token = csrf_of(c, "/login/totp")
    r = c.post("/login/totp", data={"code": "000000", "csrf_token": token}, headers=HTML)
    assert r.status_code == 401
    assert totp_secret_of(auth_app, "rad1") is None  # a wrong code enrols nothing
    code = pyotp.TOTP(secret).at(auth_app.clock())
    r = c.post("/login/totp", data={"code": code, "csrf_token": token}, headers=HTML)
    assert r.status_code == 302
    assert totp_secret_of(auth_app, "rad1") == secret
    assert c.get("/account/password").status_code == 200
    actions = audit_actions(auth_app)
    assert ("rad1", "auth.totp.enrol", "ok") in actions
    assert ("rad1", "auth.login.totp", "fail") in actions


def test_totp_code_cannot_be_replayed(auth_app: AuthApp):
    auth_app.add_user("rad1", "radiologist")
    login(auth_app, auth_app.client(), "rad1")
    secret = totp_secret_of(auth_app, "rad1")
    used = pyotp.TOTP(secret).at(auth_app.clock())  # the code login() just used
    c2 = auth_app.client()
    post_login(c2, "rad1", PASSWORD)
    r = c2.post("/login/totp", data={"code": used, "csrf_token": csrf_of(c2, "/login/totp")},
                headers=HTML)
    assert r.status_code == 401


def test_totp_guessing_locks_the_account(auth_app: AuthApp):
    auth_app.add_user("rad1", "radiologist")
    login(auth_app, auth_app.client(), "rad1")
    c = auth_app.client()
    post_login(c, "rad1", PASSWORD)
    token = csrf_of(c, "/login/totp")
    for guess in ("111111", "222222", "333333", "444444", "555555"):
        c.post("/login/totp", data={"code": guess, "csrf_token": token}, headers=HTML)
    r = c.post("/login/totp", data={"code": "666666", "csrf_token": token}, headers=HTML)
    assert r.status_code == 423
    assert post_login(auth_app.client(), "rad1", PASSWORD).status_code == 423


def test_totp_not_required_for_readers_when_config_says_so(tmp_path: Path):
    a = make_auth_app(tmp_path, lambda t: t.replace("totp_required_for_readers: true",
                                                    "totp_required_for_readers: false"))
    a.add_user("rad1", "radiologist")
    c = a.client()
    r = post_login(c, "rad1", PASSWORD)
    assert r.status_code == 302 and not r.headers["Location"].startswith("/login/totp")


def test_admin_must_change_the_initial_password(auth_app: AuthApp):
    c = auth_app.client()
    r = post_login(c, "admin", auth_app.admin_password, next_="/account/password")
    assert r.status_code == 302
    r = c.get("/", headers=HTML)
    assert r.status_code == 302 and r.headers["Location"].startswith("/account/password")
    token = csrf_of(c, "/account/password")
    r = c.post("/account/password", data={"current": auth_app.admin_password,
                                          "new": "admin-own-password", "again": "admin-own-password",
                                          "csrf_token": token}, headers=HTML)
    assert r.status_code == 302
    r = c.get("/", headers=HTML)
    assert r.status_code == 302 and "next=" not in r.headers["Location"]


# -- API tokens --------------------------------------------------------------------------------------
def test_bearer_token_authenticates_and_can_be_revoked(auth_app: AuthApp):
    auth_app.add_user("script", "site_staff")
    token = auth_app.token("script")
    c = auth_app.client()
    assert c.get("/account/password", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert c.get("/account/password", headers={"Authorization": "Bearer fat_wrong"}).status_code == 401
    assert c.get("/account/password", headers={"Authorization": f"Basic {token}"}).status_code == 401
    conn = auth_app.db()
    stored = [r[0] for r in conn.execute("SELECT token_hash FROM api_tokens")]
    assert token not in stored and len(stored) == 1  # only the hash is kept
    tid = conn.execute("SELECT id FROM api_tokens").fetchone()[0]
    assert tokens.revoke(conn, tid)
    conn.close()
    assert c.get("/account/password", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_token_expiry(auth_app: AuthApp):
    auth_app.add_user("script", "site_staff")
    conn = auth_app.db()
    token = tokens.create_token(conn, "script", expires_in_s=3600, now=auth_app.clock())
    conn.close()
    c = auth_app.client()
    h = {"Authorization": f"Bearer {token}"}
    assert c.get("/account/password", headers=h).status_code == 200
    auth_app.clock.advance(3601)
    assert c.get("/account/password", headers=h).status_code == 401


def test_bearer_post_needs_no_csrf_but_cookie_post_does(auth_app: AuthApp):
    auth_app.add_user("rad1", "radiologist")
    token = auth_app.token("rad1")
    c = auth_app.client()
    r = c.post("/break-glass", data={"study": "1.2.3", "reason": "stroke call, on-call cover"},
               headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 302


# -- break-glass ------------------------------------------------------------------------------------------
def test_break_glass_needs_a_reason_and_is_audited(auth_app: AuthApp):
    auth_app.add_user("rad1", "radiologist")
    c = auth_app.client()
    login(auth_app, c, "rad1")
    token = csrf_of(c, "/break-glass?study=1.2.840.99")
    r = c.post("/break-glass", data={"study": "1.2.840.99", "reason": "x", "csrf_token": token},
               headers=HTML)
    assert r.status_code == 400
    reason = "Stroke alert, the on-call neuro reader is unreachable"
    r = c.post("/break-glass", data={"study": "1.2.840.99", "reason": reason,
                                     "csrf_token": token}, headers=HTML)
    assert r.status_code == 302
    assert r.headers["Location"] == "/viewer?StudyInstanceUIDs=1.2.840.99"
    conn = auth_app.db()
    rows = conn.execute("SELECT study_uid, reason FROM break_glass").fetchall()
    audit_row = conn.execute("SELECT actor, object, detail FROM audit WHERE action = "
                             "'study.break_glass'").fetchone()
    conn.close()
    assert [tuple(r) for r in rows] == [("1.2.840.99", reason)]
    assert audit_row["actor"] == "rad1" and audit_row["object"] == "1.2.840.99"
    assert reason in audit_row["detail"]


def test_session_secret_key_is_generated_once_0600(auth_app: AuthApp):
    key = auth_app.data_dir / "keys" / "web-session.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = key.read_bytes()
    create_app(config.load(auth_app.data_dir))
    assert key.read_bytes() == first and len(first) >= 64


def test_old_argon2_parameters_are_upgraded_at_sign_in(auth_app: AuthApp):
    from argon2 import PasswordHasher

    auth_app.add_user("staff1", "site_staff")
    conn = auth_app.db()
    old = PasswordHasher(time_cost=3, memory_cost=65536, parallelism=4).hash(PASSWORD)
    conn.execute("UPDATE users SET password_hash = ? WHERE username = 'staff1'", (old,))
    assert post_login(auth_app.client(), "staff1", PASSWORD).status_code == 302
    new = conn.execute("SELECT password_hash FROM users WHERE username='staff1'").fetchone()[0]
    conn.close()
    assert new != old and new.startswith("$argon2id$") and not accounts.needs_rehash(new)
    assert accounts.check_password(new, PASSWORD)


def test_each_role_lands_on_its_first_area(auth_app: AuthApp):
    auth_app.add_user("rad1", "radiologist")
    auth_app.add_user("staff1", "site_staff")
    auth_app.add_user("resp1", "responder")
    homes = {}
    for name in ("rad1", "staff1", "resp1"):
        c = auth_app.client()
        login(auth_app, c, name)
        homes[name] = c.get("/", headers=HTML).headers["Location"]
        nav = c.get("/account/password", headers=HTML).get_data(as_text=True)
        assert ("/admin/audit" in nav) is False  # admin pages are not offered to others
    assert homes["rad1"] == "/worklist"
    assert homes["staff1"] == "/critical"
    assert homes["resp1"] == "/critical"


def test_session_ends_after_its_maximum_life_however_active(auth_app: AuthApp):
    auth_app.add_user("staff1", "site_staff")
    c = auth_app.client()
    login(auth_app, c, "staff1")
    signed_in_at = auth_app.clock()
    for _ in range(12 * 6 + 2):  # a request every 10 minutes
        auth_app.clock.advance(600)
        if c.get("/account/password").status_code != 200:
            break
    assert 12 * 3600 < auth_app.clock() - signed_in_at <= 12 * 3600 + 600
    assert c.get("/account/password").status_code == 401


def test_disabled_users_tokens_stop_working(auth_app: AuthApp):
    auth_app.add_user("script", "site_staff")
    token = auth_app.token("script")
    h = {"Authorization": f"Bearer {token}"}
    c = auth_app.client()
    assert c.get("/account/password", headers=h).status_code == 200
    conn = auth_app.db()
    accounts.set_disabled(conn, "script", True)
    conn.close()
    assert c.get("/account/password", headers=h).status_code == 401


def test_totp_keys_are_sealed_in_the_database(auth_app: AuthApp):
    auth_app.add_user("rad1", "radiologist")
    login(auth_app, auth_app.client(), "rad1")
    secret = totp_secret_of(auth_app, "rad1")
    conn = auth_app.db()
    dump = "\n".join(conn.iterdump())
    stored = conn.execute("SELECT id, totp_secret FROM users WHERE username='rad1'").fetchone()
    conn.close()
    assert secret and secret not in dump and stored["totp_secret"].startswith("v1:")
    key = auth_app.data_dir / "keys" / "totp.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(InvalidTag):  # bound to the user: copied onto another account it fails
        accounts.open_totp(auth_app.data_dir / "keys", stored["totp_secret"], stored["id"] + 1)
