"""Notifications that leave the box, with a real SMTP server on loopback (aiosmtpd): the STAT
CT head escalation mail without patient identity, its acknowledgement link stopping the next
escalation step, and the unacknowledged page going on to the next people."""

from __future__ import annotations

import re

import pytest
from notify_site import (
    PATIENT_ID,
    PATIENT_NAME,
    SmtpServer,
    add_contact,
    first_received,
    notify_yaml,
    sweep_all,
)
from reporting_site import ingest_study
from test_auth import HTML, PASSWORD, login, make_auth_app

from appliance.core import audit, metrics
from appliance.reading import worklist


@pytest.fixture
def smtp():
    server = SmtpServer()
    yield server
    server.stop()


@pytest.fixture
def site(tmp_path, smtp):
    a = make_auth_app(tmp_path, yaml_edit=lambda t: t + notify_yaml(smtp.port))
    for name in ("dr.ray", "dr.lee"):
        a.add_user(name, "radiologist")
    conn = a.db()
    for name in ("dr.ray", "dr.lee", "admin"):
        add_contact(conn, name, "email", f"{name}@hospital.example", a.clock())
    conn.close()
    return a


def _stat_head(a) -> tuple[str, float]:
    uid = ingest_study(a, 2, study_description="CT HEAD STROKE", patient_id=PATIENT_ID,
                       patient_name=PATIENT_NAME, body_part="HEAD")
    conn = a.db()
    try:
        return uid, first_received(conn, uid)
    finally:
        conn.close()


def _no_patient(raw: bytes) -> None:
    text = raw.decode("utf-8", "replace")
    for bad in (PATIENT_NAME, *PATIENT_NAME.split("^"), PATIENT_ID, "STROKE"):
        assert bad.lower() not in text.lower(), f"{bad!r} left the box"


def _ack_path(mail) -> str:
    body = mail.get_payload(decode=True).decode()
    return re.search(r"https?://[^/\s]+(/notify/ack/\S+)", body).group(1)


def test_stat_ct_head_mail_has_no_patient_and_its_link_stops_the_next_step(site, smtp):
    a = site
    metrics.setup(a.data_dir)  # this test process writes its counters where /metrics reads
    uid, t0 = _stat_head(a)
    other, _ = _stat_head(a)  # a second STAT head nobody acknowledges: the control
    sweep_all(a.data_dir, t0 + 31)  # quiet period over: two read items
    t_pool = t0 + 15 * 60 + 1  # notify_pool at 0.5 of the 30-minute SLA
    counts = sweep_all(a.data_dir, t_pool)
    assert counts["sent"] == 4  # two readers x two items, by email
    ray = smtp.box.to("dr.ray@hospital.example")
    assert len(ray) == 2
    for raw in smtp.box.raw:
        _no_patient(raw)
    mail = ray[0]
    body = mail.get_payload(decode=True).decode()
    assert "STAT CT HEAD" in body and "due in 15 min" in body and "ACK " in body
    assert mail["Message-ID"].startswith("<n") and "field.example" in mail["Message-ID"]
    conn = a.db()
    item = worklist.item_for_study(conn, uid)
    conn.close()
    path = next(_ack_path(m) for m in ray if f"read item {item['id']}" in m["Subject"])

    # The link needs a sign-in: the login page, then back to the link.
    a.clock.t = t_pool + 60
    anon = a.client()
    r = anon.get(path, headers=HTML)
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    c = a.client()
    login(a, c, "dr.ray", PASSWORD)
    page = c.get(path, headers=HTML).get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    lee = a.client()
    login(a, lee, "dr.lee", PASSWORD)
    assert lee.get(path, headers=HTML).status_code == 403  # someone else's message
    r = c.post(path, data={"csrf_token": token}, headers=HTML)
    assert r.status_code == 200 and 'data-testid="ack-done"' in r.get_data(as_text=True)
    r = c.post(path, data={"csrf_token": token}, headers=HTML)
    assert r.status_code == 409  # one use
    altered = path[:-2] + ("AA" if not path.endswith("AA") else "BB")
    assert c.get(altered, headers=HTML).status_code == 403

    # 5 minutes later (STAT): the acknowledged page stays quiet, the other one goes on.
    before = len(smtp.box.messages)
    counts = sweep_all(a.data_dir, t_pool + 5 * 60 + 1)
    assert counts["unacknowledged"] == 1
    new = smtp.box.messages[before:]
    assert [m["To"] for m in new] == ["admin@hospital.example"]  # the on-call (admin)
    conn = a.db()
    acked_item = worklist.item_for_study(conn, uid)
    other_item = worklist.item_for_study(conn, other)
    assert f"read item {other_item['id']}" in new[0]["Subject"]
    assert "notify.acknowledged" in [h["event"] for h in worklist.history(conn, acked_item["id"])]
    assert "notify.unacknowledged" not in [h["event"] for h in
                                           worklist.history(conn, acked_item["id"])]
    assert "notify.unacknowledged" in [h["event"] for h in
                                       worklist.history(conn, other_item["id"])]
    actions = [r["action"] for r in conn.execute("SELECT action FROM audit")]
    assert "notify.acknowledged" in actions and "read_item.notify.unacknowledged" in actions
    assert audit.verify(conn)[0]
    conn.close()
    text = a.client().get("/metrics").get_data(as_text=True)
    assert 'appliance_notifications_total{channel="email",outcome="sent"} 5.0' in text
    assert 'appliance_notification_delivery_seconds_count{channel="email"} 5.0' in text
