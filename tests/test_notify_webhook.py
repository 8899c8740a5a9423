"""The webhook channel against a receiver on loopback that implements the README's scheme
itself: HMAC-SHA256 over "<timestamp>.<raw body>", a 5-minute window, one delivery per
idempotency key. A replayed or altered body is what it rejects; no patient data is sent."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port
from notify_site import PATIENT_ID, PATIENT_NAME, first_received, sweep_all
from reporting_site import ingest_study
from test_auth import make_auth_app

from appliance.notify import channels, webhook

SECRET = "s3cret-webhook-key-for-tests"


class Receiver:
    """A paging gateway: checks each POST by the documented scheme, remembers keys."""

    def __init__(self, now):
        self.now, self.accepted, self.rejected, self.raw = now, [], [], []
        self.delay = 0.0  # seconds to wait before answering (a kill lands mid-request)
        self.seen: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                verdict = outer.check(dict(self.headers), body)
                time.sleep(outer.delay)
                self.send_response(200 if verdict in ("ok", "duplicate") else 401)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def check(self, headers: dict, body: bytes) -> str:
        ts = headers.get("X-Appliance-Timestamp", "")
        mac = hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        if headers.get("X-Appliance-Signature") != f"sha256={mac}":
            self.rejected.append("signature")
            return "bad signature"
        if abs(self.now() - int(ts)) > 300:
            self.rejected.append("stale")
            return "stale"
        key = headers["X-Appliance-Idempotency-Key"]
        if key in self.seen:
            return "duplicate"
        self.seen.add(key)
        self.accepted.append((headers, body))
        return "ok"


@pytest.fixture
def receiver():
    r = Receiver(time.time)
    yield r
    r.server.shutdown()


def test_webhook_is_signed_has_no_patient_and_replays_or_edits_are_rejected(tmp_path, receiver):
    creds = tmp_path / "notify-credentials"
    channels.write_credentials(creds, {"webhook_secret": SECRET})
    a = make_auth_app(tmp_path, yaml_edit=lambda t: t + (
        f"\nnotify:\n  health_alerts: false\n  webhook_url: http://127.0.0.1:{receiver.port}/hook\n"
        f"  credentials_file: {creds}\n"))
    for name in ("dr.ray", "dr.lee"):
        a.add_user(name, "radiologist")
    uid = ingest_study(a, 2, study_description="CT HEAD", patient_id=PATIENT_ID,
                       patient_name=PATIENT_NAME, body_part="HEAD")
    conn = a.db()
    t0 = first_received(conn, uid)
    conn.close()
    sweep_all(a.data_dir, t0 + 31)
    receiver.now = lambda: t0 + 15 * 60 + 1  # the receiver's clock agrees with the sender's
    # The channel stamps real time; hand the sweep a clock at the escalation time.
    counts = sweep_all(a.data_dir, t0 + 15 * 60 + 1)
    assert counts["sent"] >= 1
    assert len(receiver.accepted) == 1, "one post per escalation step, not one per reader"
    headers, body = receiver.accepted[0]
    doc = json.loads(body)
    assert "STAT" in doc["text"] and "/notify/ack/" in doc["text"]
    for bad in (PATIENT_NAME, *PATIENT_NAME.split("^"), PATIENT_ID):
        assert bad not in body.decode()
    # Our own verify() is the same scheme the receiver implemented from the README.
    assert webhook.verify(SECRET.encode(), headers, body, now=receiver.now())
    altered = body.replace(b"STAT", b"ROUTINE")
    assert receiver.check(headers, altered) == "bad signature"
    assert not webhook.verify(SECRET.encode(), headers, altered, now=receiver.now())
    receiver.now = lambda: t0 + 15 * 60 + 1 + 301  # the same post replayed 5 minutes later
    assert receiver.check(headers, body) == "stale"
    assert not webhook.verify(SECRET.encode(), headers, body, now=receiver.now())


def test_credentials_file_readable_by_others_is_refused(tmp_path):
    creds = tmp_path / "creds"
    channels.write_credentials(creds, {"webhook_secret": SECRET})
    assert oct(creds.stat().st_mode & 0o777) == "0o600"
    creds.chmod(0o644)
    with pytest.raises(channels.CredentialsError, match="chmod 600"):
        channels.read_credentials(creds)
    creds.chmod(0o600)
    creds.write_text("smtp_pasword = x\n")
    with pytest.raises(channels.CredentialsError, match=":1: expected one of"):
        channels.read_credentials(creds)
