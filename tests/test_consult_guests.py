"""What a stranger holding an invite link gets from the real ``appliance web`` (gunicorn, HTTPS):
no TURN credentials before a host admits them, nothing of the patient before admission, and
nothing at all once the host removes them or withdraws their link.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import make_site, require_module

from appliance.accounts import users as accounts

PASSWORD = "nurse-password-guests"
PATIENT, STUDY_DESC = "DOE^JANE", "CT HEAD STROKE"
STUDY = "1.2.826.0.1.3680043.10.999.91"


class Browser:
    """One person's HTTPS session with the appliance (cookies kept, CSRF token sent)."""

    def __init__(self, requests, base: str, ca: str):
        self.http = requests.Session()
        self.http.trust_env = False  # REQUESTS_CA_BUNDLE must not replace the site's CA
        self.base, self.ca, self.csrf = base, ca, ""

    def get(self, path: str, **kw):
        r = self.http.get(self.base + path, verify=self.ca, timeout=30,
                          allow_redirects=False, **kw)
        m = re.search(r'name="csrf[-_]token" (?:value|content)="([^"]+)"', r.text)
        if m:
            self.csrf = m.group(1)
        return r

    def post(self, path: str, json: dict | None = None, data: dict | None = None, **kw):
        headers = {"X-CSRF-Token": self.csrf, "Accept": "application/json"}
        if data is not None:
            data = {**data, "csrf_token": self.csrf}
            headers["Accept"] = "text/html"
        return self.http.post(self.base + path, json=json, data=data, headers=headers,
                              verify=self.ca, timeout=30, allow_redirects=False, **kw)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """`appliance web` with a nurse account and a study of a named patient."""
    requests = require_module("requests")
    site = make_site(tmp_path_factory.mktemp("guests"))
    conn = site.db()
    accounts.add_user(conn, "nurse", "site_staff", PASSWORD, display_name="Nurse Bed 4")
    conn.execute("INSERT INTO studies (study_uid, patient_id, patient_name, study_description,"
                 " num_series, num_instances, first_received, last_received) VALUES"
                 " (?,?,?,?,?,?,?,?)", (STUDY, "P91", PATIENT, STUDY_DESC, 1, 1, time.time(),
                                          time.time()))
    conn.commit()
    conn.close()
    site.start("web", wait_port=site.web_port)
    base, ca = f"https://127.0.0.1:{site.web_port}", str(site.data_dir / "tls" / "ca.crt")

    def browser() -> Browser:
        return Browser(requests, base, ca)

    yield site, browser
    site.stop_all()


def nurse_with_consult(browser) -> tuple[Browser, int, str]:
    """A signed-in nurse who started a consult from the study, is in it, and made a link."""
    nurse = browser()
    nurse.get("/login")
    r = nurse.post("/login", data={"username": "nurse", "password": PASSWORD, "next": "/"})
    assert r.status_code == 302 and "/login" not in r.headers["Location"], r.text
    nurse.get("/consults")
    r = nurse.post("/consults", json={"study_uid": STUDY})
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    assert nurse.post(f"/consults/{cid}/join", json={}).json()["state"] == "admitted"
    url = nurse.post(f"/consults/{cid}/invite", json={}).json()["url"]
    return nurse, cid, url.split(str(nurse.base.rsplit(":", 1)[1]), 1)[1]


def guest_in_lobby(browser, link: str, name: str = "Dr Remote") -> tuple[Browser, dict]:
    guest = browser()
    assert guest.get(link).status_code == 200
    r = guest.post(link, data={"name": name})
    assert r.status_code == 302, r.text
    cid = int(r.headers["Location"].rsplit("/", 1)[1])
    guest.get(f"/consults/{cid}")
    me = guest.post(f"/consults/{cid}/join", json={})
    assert me.status_code == 200, me.text
    return guest, me.json()


def test_lobby_guest_gets_no_turn_credentials_until_admitted(web):
    """Attack: open an invite link, wait in the lobby and take the TURN credentials the
    join answer used to carry (enough to relay into the site's network)."""
    _site, browser = web
    nurse, cid, link = nurse_with_consult(browser)
    guest, me = guest_in_lobby(browser, link)
    assert me["state"] == "lobby" and me["ice_servers"] == []
    assert "turn:" not in str(me) and "credential" not in str(me)
    early = guest.post(f"/consults/{cid}/enter", json={})
    assert early.status_code == 403 and "turn:" not in early.text
    assert nurse.post(f"/consults/{cid}/admit/{me['participant']}", json={}).status_code == 200
    servers = guest.post(f"/consults/{cid}/enter", json={}).json()["ice_servers"]
    assert re.fullmatch(rf"\d+:consult-{cid}", servers[1]["username"])
    assert servers[1]["urls"][0].startswith("turn:127.0.0.1:")


def lobby_stream(guest: Browser, cid: int) -> str:
    """Everything the event stream gives a lobby guest, up to its first keepalive ping."""
    r = guest.http.get(f"{guest.base}/consults/{cid}/events?after=0", verify=guest.ca,
                       stream=True, timeout=30)
    assert r.status_code == 200
    lines = []
    try:
        for line in r.iter_lines(decode_unicode=True):
            if line == "event: ping":
                break
            lines.append(line)
    finally:
        r.close()
    return "\n".join(lines)


def test_invite_link_and_lobby_show_nothing_of_the_patient(web):
    """Attack: open a forwarded invite link (and wait in the lobby) to learn whose consult it
    is: the title made from the study names the patient."""
    _site, browser = web
    nurse, cid, link = nurse_with_consult(browser)
    room = nurse.get(f"/consults/{cid}").text
    assert PATIENT in room and STUDY_DESC in room  # the host sees the consult named
    nurse.post(f"/consults/{cid}/chat", json={"text": f"{PATIENT} BP 180/100"})
    stranger = browser()
    invite = stranger.get(link).text
    guest, me = guest_in_lobby(browser, link)
    seen = {"invite page": invite, "lobby page": guest.get(f"/consults/{cid}").text,
            "join answer": str(me), "lobby stream": lobby_stream(guest, cid),
            "enter": guest.post(f"/consults/{cid}/enter", json={}).text}
    assert "Test Site" in invite and "a consult" in invite.lower()
    for what, text in seen.items():
        for secret in (PATIENT, "DOE", "JANE", STUDY_DESC, STUDY, "P91"):
            assert secret not in text, f"{secret!r} in the {what}"
    assert nurse.post(f"/consults/{cid}/admit/{me['participant']}", json={}).status_code == 200
    assert guest.post(f"/consults/{cid}/enter", json={}).json()["title"] == \
        f"{STUDY_DESC} · {PATIENT}"
    assert PATIENT in guest.get(f"/consults/{cid}").text  # in the call: named


def stream_until_gone(guest: Browser, cid: int, opened: threading.Event | None = None) -> str:
    """The guest's event stream read until the server ends it (or 25 s pass); ``opened`` is
    set once the server's first line arrived."""
    r = guest.http.get(f"{guest.base}/consults/{cid}/events?after=0", verify=guest.ca,
                       stream=True, timeout=30)
    if r.status_code != 200:
        return f"HTTP {r.status_code}"
    lines = []
    try:
        for line in r.iter_lines(decode_unicode=True):
            lines.append(line)
            if opened is not None:
                opened.set()
            if line == "event: gone":
                break
    finally:
        r.close()
    return "\n".join(lines)


def test_removed_guest_cannot_rejoin_and_revoked_link_admits_nobody(web):
    """Attack: a guest the host removed keeps their cookie and comes back (join, stream,
    chat, TURN credentials); a stranger uses a link the host withdrew."""
    site, browser = web
    nurse, cid, link = nurse_with_consult(browser)
    guest, me = guest_in_lobby(browser, link)
    assert nurse.post(f"/consults/{cid}/admit/{me['participant']}", json={}).status_code == 200
    assert guest.post(f"/consults/{cid}/chat", json={"text": "here"}).status_code == 201
    # Not a host: a guest cannot remove anyone.
    assert guest.post(f"/consults/{cid}/remove/{me['participant']}", json={}).status_code \
        in (401, 403)
    with ThreadPoolExecutor(1) as pool:
        opened = threading.Event()
        open_stream = pool.submit(stream_until_gone, guest, cid, opened)  # the page's stream
        assert opened.wait(20)
        r = nurse.post(f"/consults/{cid}/remove/{me['participant']}", json={})
        assert r.status_code == 200 and "Dr Remote" not in str(r.json()["roster"])
        assert open_stream.result(timeout=30).endswith("event: gone")  # ended at once
    assert stream_until_gone(guest, cid) == "HTTP 403"
    for path in ("join", "enter", "chat", "signal", "ladder"):
        got = guest.post(f"/consults/{cid}/{path}", json={"text": "back", "to": 1,
                                                          "step": "video"})
        assert got.status_code == 403, (path, got.status_code, got.text)
        assert "turn:" not in got.text
    assert "Dr Remote" not in str(nurse.post(f"/consults/{cid}/join", json={}).json()["roster"])
    # Withdrawn links: the guest waiting in the lobby is turned away, nobody new gets in,
    # a guest in the call from it stays but cannot come back once gone.
    stays, stays_me = guest_in_lobby(browser, link, "Dr Stays")
    nurse.post(f"/consults/{cid}/admit/{stays_me['participant']}", json={})
    waiting, wait_me = guest_in_lobby(browser, link, "Dr Waiting")
    r = nurse.post(f"/consults/{cid}/invites/revoke", json={})
    assert r.status_code == 200 and r.json()["revoked"] == 1
    assert waiting.post(f"/consults/{cid}/join", json={}).status_code == 403
    assert nurse.post(f"/consults/{cid}/admit/{wait_me['participant']}", json={}) \
        .status_code == 400
    stranger = browser()
    page = stranger.get(link)
    assert page.status_code == 403 and "withdrawn" in page.text
    assert stays.post(f"/consults/{cid}/chat", json={"text": "still here"}).status_code == 201
    stays.post(f"/consults/{cid}/leave", json={})
    assert stays.post(f"/consults/{cid}/join", json={}).status_code == 403
    conn = site.db()
    actions = [r["action"] for r in conn.execute(
        "SELECT action FROM audit WHERE action IN ('consult.remove', 'consult.invite_revoke')"
        " ORDER BY id")]
    conn.close()
    assert actions == ["consult.remove", "consult.invite_revoke"]
