"""SMS through Debian's gammu-smsd with gammu's dummy phone: the escalation SMS goes through
gammu-smsd's outbox to "sent", carries no patient identity, and an "ACK <code>" reply that
gammu-smsd receives acknowledges it; an unknown code or an unknown number changes nothing."""

from __future__ import annotations

import re

import pytest
from notify_site import GammuSmsd, add_contact, first_received, sweep_all
from reporting_site import ingest_study
from test_auth import make_auth_app

from appliance.core import config, db
from appliance.notify import acks
from appliance.reading import worklist

RAY, LEE = "+254700000001", "+254700000002"
NAME, PID = "ODHIAMBO^ACHIENG", "P-7731"


@pytest.fixture
def smsd(tmp_path):
    d = GammuSmsd(tmp_path)
    yield d
    d.stop()


def _state(conn):
    return (conn.execute("SELECT COUNT(*) FROM notify_messages WHERE acked_at IS NOT NULL")
            .fetchone()[0],
            conn.execute("SELECT COUNT(*) FROM notify_pages WHERE acked_at IS NOT NULL")
            .fetchone()[0])


def test_sms_goes_through_gammu_smsd_and_an_ack_reply_acknowledges(tmp_path, smsd):
    a = make_auth_app(tmp_path, yaml_edit=lambda t: t + f"\nnotify:\n  health_alerts: false\n  sms_spool: {smsd.spool}\n")
    for name in ("dr.ray", "dr.lee"):
        a.add_user(name, "radiologist")
    conn = a.db()
    add_contact(conn, "dr.ray", "sms", RAY, a.clock())
    add_contact(conn, "dr.lee", "sms", LEE, a.clock())
    conn.close()
    uid = ingest_study(a, 2, study_description="CT HEAD", patient_id=PID, patient_name=NAME,
                       body_part="HEAD")
    conn = a.db()
    t0 = first_received(conn, uid)
    conn.close()
    sweep_all(a.data_dir, t0 + 31)
    t = t0 + 15 * 60 + 1
    assert sweep_all(a.data_dir, t)["sent"] == 2
    sent = smsd.wait_files("sent", 2)  # gammu-smsd took both from its outbox
    assert not list((smsd.spool / "outbox").glob("OUT*"))
    ray_file = next(p for p in sent if f"_{RAY}_" in p.name)
    text = ray_file.read_text()
    for bad in (NAME, "ODHIAMBO", "ACHIENG", PID):
        assert bad not in text
    assert "STAT CT HEAD" in text
    code = re.search(r"ACK ([A-Z2-9]{6})", text).group(1)

    conn = db.connect(config.load(a.data_dir).db_path)
    smsd.reply(RAY, "ACK ZZZZZZ")  # an unknown code
    smsd.reply("+254799999999", f"ACK {code}")  # the right code from a stranger's phone
    smsd.wait_files("inbox", 2)
    assert sweep_all(a.data_dir, t + 10)["sms_acks"] == 0
    assert _state(conn) == (0, 0)
    assert not list((smsd.spool / "inbox").glob("IN*.txt"))  # each reply is read once

    smsd.reply(RAY, f"ack {code}")
    smsd.wait_files("inbox", 1)
    assert sweep_all(a.data_dir, t + 20)["sms_acks"] == 1
    assert _state(conn) == (1, 1)
    item = worklist.item_for_study(conn, uid)
    ack = [h for h in worklist.history(conn, item["id"]) if h["event"] == "notify.acknowledged"]
    assert ack and ack[0]["actor"] == "dr.ray" and ack[0]["detail"]["via"] == "sms"
    with pytest.raises(acks.AckError):  # one use: the same code again is refused
        acks.acknowledge(conn, conn.execute("SELECT id FROM notify_messages WHERE ack_code = ?",
                                            (code,)).fetchone()[0], "dr.ray", t + 30, "sms")
    counts = sweep_all(a.data_dir, t + 5 * 60 + 30)  # past ack_minutes: nobody else paged
    assert counts["unacknowledged"] == 0
    conn.close()
