"""Consult rooms through Flask's test client: start from a study, invite links (signed,
expiring, single-consult), the guest lobby, signaling and chat over the SSE stream, ladder and
getStats records, TURN REST credentials; and coturn itself accepting those credentials."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import stat
import subprocess

import pytest
from conftest import free_port, require_tool
from test_auth import HTML, AuthApp, login, make_auth_app

from appliance.consults import rooms as consults
from appliance.consults import turn
from appliance.core import config

STUDY = "1.2.826.0.1.3680043.10.999.77"


@pytest.fixture
def app(tmp_path) -> AuthApp:
    a = make_auth_app(tmp_path, yaml_edit=lambda t: t.replace(
        "totp_required_for_readers: true", "totp_required_for_readers: false"))
    a.app.config["CONSULT_STREAM_S"] = 1.0  # streams end soon; the browser would reconnect
    a.add_user("nurse", "site_staff", display_name="Nurse Bed 4")
    a.add_user("neuro", "neurologist", display_name="Dr Neuro")
    a.add_user("admin2", "admin")
    conn = a.db()
    conn.execute("INSERT INTO studies (study_uid, patient_id, patient_name, study_description,"
                 " num_series, num_instances, first_received, last_received) VALUES"
                 " (?,?,?,?,?,?,?,?)", (STUDY, "P77", "DOE^STROKE", "CT HEAD STROKE", 1, 1,
                                          a.clock(), a.clock()))
    conn.close()
    return a


def csrf(client) -> str:
    page = client.get("/consults", headers=HTML).get_data(as_text=True)
    return re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


def guest_csrf(client, url: str) -> str:
    page = client.get(url, headers=HTML).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def read_events(client, cid: int, want: int, after: int = 0) -> list[dict]:
    """Read the SSE stream until ``want`` events arrived (the stream is closed after)."""
    resp = client.get(f"/consults/{cid}/events", headers={"Last-Event-ID": str(after)},
                      buffered=False)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    out = []
    try:
        for chunk in resp.response:
            for line in chunk.decode().splitlines():
                if line.startswith("data: ") and line != "data: {}":  # {}: a ping
                    out.append(json.loads(line[6:]))
            if len(out) >= want:
                break
    finally:
        resp.close()
    return out


def audit_rows(a: AuthApp, action: str) -> list:
    conn = a.db()
    try:
        return conn.execute("SELECT actor, object, outcome, detail FROM audit WHERE action = ?"
                            " ORDER BY id", (action,)).fetchall()
    finally:
        conn.close()


def start_consult(a: AuthApp, client, study: str = STUDY) -> int:
    r = client.post("/consults", json={"study_uid": study}, headers={"X-CSRF-Token": csrf(client)})
    assert r.status_code == 201, r.get_data(as_text=True)
    return r.get_json()["id"]


def test_start_from_study_invite_guest_lobby_admit_chat(app: AuthApp):
    nurse = app.client()
    login(app, nurse, "nurse")
    token = csrf(nurse)
    cid = start_consult(app, nurse)
    assert "CT HEAD STROKE" in nurse.get(f"/consults/{cid}", headers=HTML).get_data(as_text=True)
    me = nurse.post(f"/consults/{cid}/join", json={}, headers={"X-CSRF-Token": token}).get_json()
    assert me["state"] == "admitted" and me["host"]
    turn_server = me["ice_servers"][1]
    assert turn_server["urls"][0] == "turn:localhost:3478?transport=udp"
    assert re.fullmatch(rf"\d+:consult-{cid}", turn_server["username"])

    url = nurse.post(f"/consults/{cid}/invite", json={}, headers={"X-CSRF-Token": token}) \
        .get_json()["url"]
    path = url.split("localhost", 1)[1]
    key = (app.data_dir / "keys" / consults.INVITE_KEY_FILE)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.read_text() not in url

    # A guest (no account) opens the link, types a name and waits in the lobby.
    guest = app.client("10.9.9.9")
    page = guest.get(path, headers=HTML)
    assert page.status_code == 200 and 'name="name"' in page.get_data(as_text=True)
    assert "/login?next=/consults/join/" in page.get_data(as_text=True)  # readers: TOTP path
    neuro = app.client("10.9.9.10")
    login(app, neuro, "neuro")
    straight = neuro.get(path, headers=HTML)  # signed in: no lobby
    assert straight.status_code == 302 and straight.headers["Location"] == f"/consults/{cid}"
    gtoken = guest_csrf(guest, path)
    bad = guest.post(path, data={"name": " ", "csrf_token": gtoken}, headers=HTML)
    assert bad.status_code == 400 and "type your name" in bad.get_data(as_text=True)
    r = guest.post(path, data={"name": "Dr Remote", "csrf_token": gtoken}, headers=HTML)
    assert r.status_code == 302 and r.headers["Location"] == f"/consults/{cid}"
    gme = guest.post(f"/consults/{cid}/join", json={}, headers={"X-CSRF-Token": gtoken}).get_json()
    assert gme["state"] == "lobby" and not gme["host"]
    # In the lobby: no chat, no signaling, no chat history in the stream, only presence.
    assert guest.post(f"/consults/{cid}/chat", json={"text": "hi"},
                      headers={"X-CSRF-Token": gtoken}).status_code == 403
    nurse.post(f"/consults/{cid}/chat", json={"text": "BP 180/100, onset 40 min"},
               headers={"X-CSRF-Token": token})
    lobby_events = read_events(guest, cid, want=2)
    assert {e["kind"] for e in lobby_events} == {"presence"}
    # Guests cannot admit themselves; the nurse admits.
    assert guest.post(f"/consults/{cid}/admit/{gme['participant']}", json={},
                      headers={"X-CSRF-Token": gtoken}).status_code in (401, 403)
    r = nurse.post(f"/consults/{cid}/admit/{gme['participant']}", json={},
                   headers={"X-CSRF-Token": token})
    assert r.status_code == 200
    assert {p["name"]: p["state"] for p in r.get_json()["roster"]} == \
        {"Nurse Bed 4": "admitted", "Dr Remote": "admitted"}
    # Admitted: the guest reads the chat, posts, and signals the nurse.
    assert guest.post(f"/consults/{cid}/chat", json={"text": "Thrombolysis: no contraindication"},
                      headers={"X-CSRF-Token": gtoken}).status_code == 201
    sig = guest.post(f"/consults/{cid}/signal", json={"to": me["participant"],
                                                      "data": {"gen": 0, "description": "x"}},
                     headers={"X-CSRF-Token": gtoken})
    assert sig.status_code == 200
    got = read_events(nurse, cid, want=1, after=sig.get_json()["id"] - 1)
    assert got[0]["kind"] == "signal" and got[0]["sender"] == gme["participant"]
    everything = read_events(guest, cid, want=6)
    chats = [e["body"]["text"] for e in everything if e["kind"] == "chat"]
    assert chats == ["BP 180/100, onset 40 min", "Thrombolysis: no contraindication"]
    assert not any(e["kind"] == "signal" for e in everything)  # own signal not echoed

    # Chat is attached to the study and audited (who, from where); so are join/admit/invite.
    conn = app.db()
    assert [m["text"] for m in consults.chat_for_study(conn, STUDY)] == chats
    conn.close()
    actors = [(r["actor"], r["object"]) for r in audit_rows(app, "consult.chat")]
    assert actors == [("nurse", STUDY), ("guest:Dr Remote", STUDY)]
    assert audit_rows(app, "consult.admit")[0]["actor"] == "nurse"
    assert len(audit_rows(app, "consult.invite")) == 1
    assert len(audit_rows(app, "consult.lobby")) == 1


def test_invite_links_are_signed_expiring_single_consult(app: AuthApp):
    nurse = app.client()
    login(app, nurse, "nurse")
    token = csrf(nurse)
    cid = start_consult(app, nurse)
    other = start_consult(app, nurse, study="")
    url = nurse.post(f"/consults/{cid}/invite", json={}, headers={"X-CSRF-Token": token}) \
        .get_json()["url"]
    link = url.split("localhost", 1)[1]
    payload, sig = link.rsplit("/", 1)[1].split(".")
    guest = app.client("10.9.9.9")
    # Tampered: the consult number swapped for another one.
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["c"] = other
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    r = guest.get(f"/consults/join/{forged}.{sig}", headers=HTML)
    assert r.status_code == 403 and "not valid" in r.get_data(as_text=True)
    assert guest.get("/consults/join/garbage", headers=HTML).status_code == 403
    # A guest holding a link to one consult cannot read another.
    gtoken = guest_csrf(guest, link)
    guest.post(link, data={"name": "Dr Remote", "csrf_token": gtoken}, headers=HTML)
    assert guest.get(f"/consults/{other}/events").status_code == 403
    # Expired after consults.invite_minutes.
    app.clock.advance(61 * 60)
    r = app.client("10.9.9.8").get(link, headers=HTML)
    assert r.status_code == 403 and "expired" in r.get_data(as_text=True)
    app.clock.advance(-61 * 60)
    # An ended consult closes its links and streams.
    assert nurse.post(f"/consults/{cid}/end", json={}, headers={"X-CSRF-Token": token}) \
        .status_code == 200
    r = app.client("10.9.9.7").get(link, headers=HTML)
    assert r.status_code == 403 and "ended" in r.get_data(as_text=True)
    assert guest.get(f"/consults/{cid}/events").status_code == 403


def test_bad_input_is_refused_and_changes_nothing(app: AuthApp):
    nurse = app.client()
    login(app, nurse, "nurse")
    token = csrf(nurse)
    r = nurse.post("/consults", json={"study_uid": "9.9.9"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 400 and "no study 9.9.9" in r.get_json()["error"]
    cid = start_consult(app, nurse)
    nurse.post(f"/consults/{cid}/join", json={}, headers={"X-CSRF-Token": token})
    h = {"X-CSRF-Token": token}
    assert nurse.post(f"/consults/{cid}/signal", json={"to": 999, "data": {}},
                      headers=h).status_code == 400
    assert nurse.post(f"/consults/{cid}/chat", json={"text": "x" * 2001}, headers=h) \
        .status_code == 400
    assert nurse.post(f"/consults/{cid}/ladder", json={"step": "panic"}, headers=h) \
        .status_code == 400
    assert nurse.post(f"/consults/{cid}/stats", json={"samples": [{"fps": 3}]}, headers=h) \
        .status_code == 400
    assert nurse.post(f"/consults/{cid}/chat", json={"text": "x"}).status_code == 400  # no CSRF
    conn = app.db()
    assert conn.execute("SELECT count(*) FROM consults").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM consult_events WHERE kind != 'presence'") \
        .fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM consult_stats").fetchone()[0] == 0
    conn.close()
    # Readers of other kinds than hosts: a radiologist may host; nobody signed out may.
    assert app.client().get(f"/consults/{cid}/events").status_code == 403
    assert app.client().post("/consults", json={}).status_code == 401


def test_a_late_leave_from_a_reloaded_page_does_not_end_the_new_one(app: AuthApp):
    nurse = app.client()
    login(app, nurse, "nurse")
    h = {"X-CSRF-Token": csrf(nurse)}
    cid = start_consult(app, nurse)
    old = nurse.post(f"/consults/{cid}/join", json={}, headers=h).get_json()
    app.clock.advance(5)
    new = nurse.post(f"/consults/{cid}/join", json={}, headers=h).get_json()  # the reload
    assert new["participant"] == old["participant"] and new["seat"] > old["seat"]
    late = nurse.post(f"/consults/{cid}/leave", json={"seat": old["seat"]}, headers=h)
    assert late.get_json() == {"ok": True, "left": False}
    assert [p["state"] for p in new["roster"]] == ["admitted"]
    assert nurse.post(f"/consults/{cid}/leave", json={"seat": new["seat"]}, headers=h) \
        .get_json()["left"] is True


def test_ladder_and_stats_make_the_call_summary(app: AuthApp):
    nurse, neuro = app.client(), app.client("10.0.0.2")
    login(app, nurse, "nurse")
    login(app, neuro, "neuro")
    cid = start_consult(app, nurse)
    h1, h2 = {"X-CSRF-Token": csrf(nurse)}, {"X-CSRF-Token": csrf(neuro)}
    nurse.post(f"/consults/{cid}/join", json={}, headers=h1)
    neuro.post(f"/consults/{cid}/join", json={}, headers=h2)
    for ms in (300, 500, 900):
        assert nurse.post(f"/consults/{cid}/ladder", json={"step": "joined", "join_ms": ms},
                          headers=h1).status_code == 200
    r = neuro.post(f"/consults/{cid}/ladder", json={"step": "audio_only", "after_ms": 5000},
                   headers=h2)
    assert r.status_code == 200
    ladder_seen = [e for e in read_events(nurse, cid, want=8) if e["kind"] == "ladder"]
    assert ladder_seen[-1]["body"] == {"step": "audio_only", "name": "Dr Neuro", "after_ms": 5000}
    t = app.clock()
    samples = [{"ts": t + i, "loss": 0.01, "jitter_ms": 4, "rtt_ms": 2, "fps": 30,
                "kbit_s": 900, "step": "video" if i < 3 else "audio_only"} for i in range(4)]
    assert neuro.post(f"/consults/{cid}/stats", json={"samples": samples}, headers=h2) \
        .get_json() == {"stored": 4}
    conn = app.db()
    s = consults.call_summary(conn)
    conn.close()
    assert s["joins"] == 3 and s["join_ms_p50"] == 500 and s["join_ms_p95"] == 900
    assert s["degraded_share"] == 0.25 and s["drop_rate"] == 0.0
    # Joins feed the SLO (video join under 5 s); ending the call records it as not dropped.
    assert nurse.post(f"/consults/{cid}/ladder", json={"step": "joined", "join_ms": 6000},
                      headers=h1).status_code == 200
    nurse.post(f"/consults/{cid}/end", json={}, headers=h1)
    conn = app.db()
    slo = conn.execute("SELECT slo, value, good FROM slo_observations WHERE slo != 'auth' ORDER BY id").fetchall()
    conn.close()
    assert [tuple(r) for r in slo] == [("video_join", 0.3, 1), ("video_join", 0.5, 1),
                                       ("video_join", 0.9, 1), ("video_join", 6.0, 0),
                                       ("call_drop", 0.0, 1)]
    figures = nurse.get("/consults/summary?days=1").get_json()
    assert figures["joins"] == 4 and figures["join_ms_p95"] == 6000
    assert figures["degraded_share"] == 0.25 and figures["calls"] == 1
    assert nurse.get("/consults/summary?days=x").status_code == 400
    record = nurse.get(f"/consults/{cid}/record").get_json()
    assert record["consult"]["ended_at"] is not None
    assert [p["name"] for p in record["participants"]] == ["Nurse Bed 4", "Dr Neuro"]
    assert audit_rows(app, "consult.view")[0]["actor"] == "nurse"


def test_turn_rest_credentials_and_coturn_config(tmp_path):
    secret = "s3cr3t"
    user, password = consults.turn_credentials(secret, 7, 3600, now=1_000_000)
    assert user == "1003600:consult-7"
    assert password == base64.b64encode(
        hmac.new(b"s3cr3t", b"1003600:consult-7", hashlib.sha1).digest()).decode()
    a = make_auth_app(tmp_path)
    cfg = config.load(a.data_dir)
    text = turn.render(cfg)
    assert "use-auth-secret" in text and f"static-auth-secret={consults.turn_secret(cfg.keys_dir)}" \
        in text
    argv = turn.command(cfg) if turn.binary() else ["turnserver", "-c", str(turn.write_config(cfg))]
    assert consults.turn_secret(cfg.keys_dir) not in " ".join(argv)
    assert stat.S_IMODE(turn.config_path(cfg).stat().st_mode) == 0o600
    assert stat.S_IMODE((cfg.keys_dir / consults.TURN_SECRET_FILE).stat().st_mode) == 0o600


def test_coturn_allocates_with_minted_credentials_only(tmp_path):
    """The real coturn: a relay allocation works with a minted credential, not a forged one."""
    require_tool("turnserver", "/usr/bin/turnserver")
    uclient = require_tool("turnutils_uclient", "/usr/bin/turnutils_uclient")
    port = free_port()
    a = make_auth_app(tmp_path, yaml_edit=lambda t: t.replace("turn_port: 3478", f"turn_port: {port}")
                      .replace('turn_bind: "0.0.0.0"', 'turn_bind: "127.0.0.1"')
                      .replace("allowed_peer_ips: []", 'allowed_peer_ips: ["127.0.0.1"]'))
    cfg = config.load(a.data_dir)
    proc = subprocess.Popen(turn.command(cfg), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_udp_turn(uclient, port)
        user, password = consults.turn_credentials(consults.turn_secret(cfg.keys_dir), 1, 600)

        def allocate(u: str, p: str) -> subprocess.CompletedProcess:
            return subprocess.run([uclient, "-y", "-n", "1", "-m", "1", "-l", "64", "-u", u,
                                   "-w", p, "-p", str(port), "127.0.0.1"],
                                  capture_output=True, text=True, timeout=30)

        ok = allocate(user, password)  # relays 4 messages client to client through coturn
        assert ok.returncode == 0 and "tot_recv_msgs=4" in ok.stdout, ok.stdout[-2000:]
        forged = allocate(user, base64.b64encode(b"x" * 20).decode())
        assert forged.returncode != 0 and "Cannot complete Allocation" in forged.stdout
        expired_user, expired_pw = consults.turn_credentials(
            consults.turn_secret(cfg.keys_dir), 1, -60)
        expired = allocate(expired_user, expired_pw)
        assert expired.returncode != 0 and "Cannot complete Allocation" in expired.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_udp_turn(uclient: str, port: int) -> None:
    """coturn is up when it answers a STUN binding request on its port."""
    import socket
    import time

    deadline = time.monotonic() + 10
    req = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"\x01" * 12
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            s.sendto(req, ("127.0.0.1", port))
            try:
                if s.recv(2048)[:2] == b"\x01\x01":
                    return
            except OSError:
                pass
    raise TimeoutError("coturn did not answer STUN")


def test_status_page_and_metrics_show_consult_figures(app: AuthApp):
    """Known joins, stats and a dropped call come back as p50/p95, drop rate and degraded share
    from /status.json, the /status page and /metrics alike."""
    import time

    now = time.time()
    conn = app.db()
    calm = consults.create_consult(conn, "nurse", title="calm", now=now - 60)
    rough = consults.create_consult(conn, "nurse", title="rough", now=now - 50)
    pid = consults.join_user(conn, calm, {"id": 1, "username": "nurse", "role": "site_staff"},
                             now=now - 40)
    me = consults.participant(conn, pid)
    for ms in (400, 800, 1200, 3000):
        consults.record_ladder(conn, calm, me, {"step": "joined", "join_ms": ms}, now=now - 30)
    consults.record_stats(conn, calm, pid, [
        {"ts": now - 20 + i, "step": step} for i, step in
        enumerate(("video", "video", "video", "audio_only", "chat_only", "video", "video",
                   "video"))])
    other = consults.participant(conn, consults.join_user(
        conn, rough, {"id": 2, "username": "neuro", "role": "neurologist"}, now=now - 40))
    consults.record_ladder(conn, rough, other, {"step": "dropped", "after_ms": 31000},
                           now=now - 10)
    conn.close()
    client = app.client()
    login(app, client, "admin2")
    report = client.get("/status.json").get_json()
    assert report["detailed"]
    figures = report["consults"]
    assert (figures["calls"], figures["joins"]) == (2, 4)
    assert (figures["join_ms_p50"], figures["join_ms_p95"]) == (1200, 3000)
    assert figures["drop_rate"] == 0.5 and figures["degraded_share"] == 0.25
    page = client.get("/status", headers=HTML).get_data(as_text=True)
    shown = dict(re.findall(r'data-figure="(\w+)">([^<]*)<', page))
    assert shown == {"calls": "2", "joins": "4", "join_p50": "1.20 s", "join_p95": "3.00 s",
                     "drop_rate": "50.0%", "degraded": "25.0%"}
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'appliance_consult_join_quantile_seconds{quantile="0.5"} 1.2' in metrics
    assert 'appliance_consult_join_quantile_seconds{quantile="0.95"} 3.0' in metrics
    assert "appliance_consult_drop_ratio 0.5" in metrics
    assert "appliance_consult_degraded_ratio 0.25" in metrics
    assert "appliance_consult_calls_30d 2.0" in metrics


def test_record_button_asks_the_media_service_after_consent_only(app: AuthApp):
    """POST /consults/N/recording: refused before consent and without sync.recipients (nothing
    is recorded in the clear); then one job for the media service, stopped by .../stop."""
    nurse = app.client()
    login(app, nurse, "nurse")
    cid = start_consult(app, nurse)
    h = {"X-CSRF-Token": csrf(nurse)}
    r = nurse.post(f"/consults/{cid}/recording", json={}, headers=h)
    assert r.status_code == 400 and "sync.recipients" in r.get_json()["error"]
    app.app.config["SITE"]["sync"]["recipients"] = ["age1" + "q" * 58]
    r = nurse.post(f"/consults/{cid}/recording", json={}, headers=h)
    assert r.status_code == 400 and "consent" in r.get_json()["error"]
    nurse.post(f"/consults/{cid}/consent", json={}, headers=h)
    r = nurse.post(f"/consults/{cid}/recording", json={"seconds": 600}, headers=h)
    assert r.status_code == 202 and r.get_json()["state"] == "queued"
    again = nurse.post(f"/consults/{cid}/recording", json={}, headers=h).get_json()["job"]
    assert again == r.get_json()["job"]  # asked twice: one recording
    assert nurse.post(f"/consults/{cid}/recording", json={"seconds": "x"},
                      headers=h).status_code == 400
    assert nurse.post(f"/consults/{cid}/recording/stop", json={}, headers=h).get_json() == \
        {"stopped": 1}
    # A sealed recording (as the media service indexes it) is part of the consult's record.
    from appliance.consults import recordings as consult_recordings

    sealed = app.data_dir / "recordings" / f"consult-{cid}-j1-t1-p1-g0.mkv.age"
    sealed.parent.mkdir(parents=True, exist_ok=True)
    sealed.write_bytes(b"age-encryption.org/v1\n(test stand-in)")
    conn = app.db()
    consult_recordings.register(conn, sealed, complete=False)
    conn.close()
    listed = nurse.get(f"/consults/{cid}/record").get_json()["recordings"]
    assert [(r["name"], r["complete"], r["size"]) for r in listed] == \
        [(sealed.name, 0, sealed.stat().st_size)]
    assert [r["action"] for r in audit_rows_all(app) if r["action"].startswith(
        "consult.record")] == ["consult.recording_consent", "consult.record_request",
                               "consult.record_stop"]


def audit_rows_all(a: AuthApp) -> list:
    conn = a.db()
    try:
        return conn.execute("SELECT action FROM audit ORDER BY id").fetchall()
    finally:
        conn.close()


def test_invite_link_uses_the_public_address_when_set(app: AuthApp):
    """With web.public_url set, the link a remote specialist gets is under it, not under the
    local address the bedside's browser used (here the test client's http://localhost)."""
    app.app.config["SITE"]["web"]["public_url"] = "https://field-7.example.org:8443"
    nurse = app.client()
    login(app, nurse, "nurse")
    cid = start_consult(app, nurse)
    r = nurse.post(f"/consults/{cid}/invite", json={}, headers={"X-CSRF-Token": csrf(nurse)})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["url"].startswith("https://field-7.example.org:8443/consults/join/")
