"""Open-redirect attacks on the four routes that redirect to a caller-given ``next``.

Each known bypass form is sent to /login, /login/totp, /break-glass and /account/password;
the Location header the app writes (after Werkzeug's own normalisation) is then resolved by
real Chromium's URL parser against the page's address, exactly as the browser would follow
it, and must stay on our origin (and be the route's own default).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import pyotp
import pytest
from conftest import require_module, require_tool
from flask.testing import FlaskClient
from test_auth import (
    HTML,
    PASSWORD,
    AuthApp,
    csrf_of,
    login,
    make_auth_app,
    post_login,
    totp_secret_of,
)

from appliance.accounts.web import safe_next

ORIGIN = "https://appliance.test"
EVIL = "evil.example"

# What the app receives once the form or query string is decoded. An attacker's link
# carries them percent-encoded: `next=/%09/evil.example` arrives as "/\t/evil.example",
# `next=%2F%2Fevil.example` as "//evil.example", `next=%252F%252F…` as "%2F%2F…".
BYPASSES = [
    f"//{EVIL}", f"///{EVIL}", f"/\\{EVIL}", f"\\\\{EVIL}", f"/\\/{EVIL}", f"\\/{EVIL}",
    f"/\t/{EVIL}", f"/\n/{EVIL}", f"/\r\n/{EVIL}", f"\t//{EVIL}", f" //{EVIL}", f"/ /{EVIL}",
    f"/%09/{EVIL}", f"%2F%2F{EVIL}", f"/%2F/{EVIL}", f"/%5C{EVIL}", f"/%5C%5C{EVIL}",
    f"%5C%5C{EVIL}", f"/%0A/{EVIL}", f"/%00/{EVIL}",
    f"https:{EVIL}", f"https://{EVIL}", f"http:/{EVIL}", f"HTTPS://{EVIL}", f"//{EVIL}:443/x",
    "javascript:alert(1)", "JaVaScRiPt:alert(1)", " javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    f"/.//{EVIL}", f"/..//{EVIL}", f"/%2e%2e//{EVIL}", f"/./\\{EVIL}",
    f"/\u3000/{EVIL}", f"/\u00a0/{EVIL}", f"\uff0f\uff0f{EVIL}", f"/\u2215{EVIL}",
    f"/\u200b/{EVIL}", f"\u2028//{EVIL}", f"\x00//{EVIL}", f"/\x7f/{EVIL}", f"/\x0c/{EVIL}",
]
GOOD = ["/worklist", "/worklist?site=north&pool=neuro", "/account/password?next=%2Fworklist"]


@pytest.fixture(scope="module")
def browser_origin():
    """A function resolving Location values with real Chromium (`new URL(loc, page)`)."""
    chromium = require_tool("chromium", "/usr/bin/chromium")
    sync_api = require_module("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page()

        def resolve(locations: list[str], base: str) -> list[str]:
            return page.evaluate(
                "([locs, base]) => locs.map(l => { try { return new URL(l, base).origin }"
                " catch (e) { return 'unparseable' } })", [locations, base])

        try:
            yield resolve
        finally:
            browser.close()


@pytest.fixture
def site(tmp_path: Path) -> AuthApp:
    # Many sign-ins in a row: the per-account budget is not what these tests are about.
    a = make_auth_app(tmp_path, lambda t: t.replace("attempts_per_account: 10",
                                                    "attempts_per_account: 10000"))
    a.add_user("staff1", "site_staff")
    a.add_user("rad1", "radiologist")
    return a


def _location(r) -> str:
    assert r.status_code in (302, 303), (r.status_code, r.get_data(as_text=True)[:300])
    return r.headers["Location"]


def _assert_on_origin(browser_origin, route: str, sent: list[str], got: list[str],
                      default: str) -> None:
    origins = browser_origin(got, ORIGIN + route)
    for value, location, origin in zip(sent, got, origins, strict=True):
        assert origin == ORIGIN, f"{route}: next={value!r} sent the browser to {location!r}"
        assert location == default, f"{route}: next={value!r} gave {location!r}"


def _client(site: AuthApp) -> FlaskClient:
    return site.client("10.1.0.1")  # https, as behind gunicorn's TLS


# -- the check itself ---------------------------------------------------------------------
@pytest.mark.parametrize("value", BYPASSES)
def test_safe_next_refuses_each_bypass_form(value):
    assert safe_next(value, "/fallback") == "/fallback"


@pytest.mark.parametrize("value", GOOD)
def test_safe_next_keeps_our_own_paths(value):
    assert safe_next(value) == value


# -- the four routes ------------------------------------------------------------------------
def test_login_next_bypass_forms_stay_on_our_origin(site, browser_origin):
    got = []
    for value in BYPASSES:
        c = _client(site)
        got.append(_location(post_login(c, "staff1", PASSWORD, next_=value)))
    signed_in = _client(site)
    login(site, signed_in, "staff1")
    for value in BYPASSES:  # GET /login when already signed in goes straight to next
        got.append(_location(signed_in.get("/login", query_string={"next": value},
                                           headers=HTML)))
    _assert_on_origin(browser_origin, "/login", BYPASSES * 2, got, "/")


def test_login_totp_next_bypass_forms_stay_on_our_origin(site, browser_origin):
    login(site, _client(site), "rad1")  # enrol once
    secret = _totp_secret(site)
    got = []
    for value in BYPASSES:
        c = _client(site)
        assert post_login(c, "rad1", PASSWORD).headers["Location"].startswith("/login/totp")
        token = csrf_of(c, "/login/totp")
        site.clock.advance(30)  # codes are single-use: a fresh time step each time
        got.append(_location(c.post("/login/totp", headers=HTML, data={
            "code": pyotp.TOTP(secret).at(site.clock()), "csrf_token": token, "next": value})))
        # and GET /login/totp once the code is in also goes straight to next
        got.append(_location(c.get("/login/totp", query_string={"next": value},
                                   headers=HTML)))
    sent = [v for v in BYPASSES for _ in range(2)]
    _assert_on_origin(browser_origin, "/login/totp", sent, got, "/")


def test_break_glass_next_bypass_forms_stay_on_our_origin(site, browser_origin):
    c = _client(site)
    login(site, c, "staff1")
    token = csrf_of(c, "/break-glass?study=1.2.3")
    got = [_location(c.post("/break-glass", headers=HTML, data={
        "study": "1.2.3", "reason": "stroke code, reader unreachable", "next": value,
        "csrf_token": token})) for value in BYPASSES]
    _assert_on_origin(browser_origin, "/break-glass", BYPASSES, got,
                      "/viewer?StudyInstanceUIDs=1.2.3")


def test_account_password_next_bypass_forms_stay_on_our_origin(site, browser_origin):
    c = _client(site)
    login(site, c, "staff1")
    token = csrf_of(c, "/account/password")
    current, other = PASSWORD, "another-long-password"
    got = []
    for value in BYPASSES:
        got.append(_location(c.post("/account/password", headers=HTML, data={
            "current": current, "new": other, "again": other, "next": value,
            "csrf_token": token})))
        current, other = other, current
    _assert_on_origin(browser_origin, "/account/password", BYPASSES, got, "/")


def test_our_own_next_paths_still_work_on_every_route(site, browser_origin):
    got = [_location(post_login(_client(site), "staff1", PASSWORD, next_=value))
           for value in GOOD]
    assert got == GOOD
    c = _client(site)
    login(site, c, "staff1")
    token = csrf_of(c, "/break-glass?study=1.2.3")
    r = c.post("/break-glass", headers=HTML, data={
        "study": "1.2.3", "reason": "stroke code, reader unreachable", "next": GOOD[1],
        "csrf_token": token})
    assert _location(r) == GOOD[1]
    assert set(browser_origin(got, ORIGIN + "/login")) == {ORIGIN}


def test_break_glass_default_keeps_the_study_in_its_query(site):
    c = _client(site)
    login(site, c, "staff1")
    token = csrf_of(c, "/break-glass?study=1.2.3")
    r = c.post("/break-glass", headers=HTML, data={
        "study": "1.2.3&x=//evil", "reason": "stroke code, reader unreachable",
        "csrf_token": token})
    assert _location(r) == "/viewer?StudyInstanceUIDs=" + quote("1.2.3&x=//evil", safe="")


def _totp_secret(site: AuthApp) -> str:
    secret = totp_secret_of(site, "rad1")
    assert secret and re.fullmatch(r"[A-Z2-7]+", secret)
    return secret
