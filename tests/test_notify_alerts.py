"""Health alerts through the outbox: a tmpfs data directory filled past the reserve raises one
alert mail (after the 2-minute grace, not repeated within the hour) and one "cleared" mail."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import missing
from notify_site import SmtpServer, add_contact, notify_yaml, sweep_all
from test_auth import make_auth_app

from appliance.core import durable


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        missing("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def smtp():
    server = SmtpServer()
    yield server
    server.stop()


def test_disk_past_the_reserve_sends_one_alert_and_one_cleared_mail(tmpfs, smtp):
    a = make_auth_app(tmpfs, yaml_edit=lambda t: t.replace("low_water_mb: 500", "low_water_mb: 4")
                      + notify_yaml(smtp.port).replace("health_alerts: false",
                                                       "health_alerts: true"))
    t = a.clock()
    conn = a.db()
    add_contact(conn, "admin", "email", "responder@relief.example", t)
    conn.close()
    reserve = lambda: [" ".join(m["Subject"].split()) for m in smtp.box.messages  # noqa: E731
                       if "reserve" in m["Subject"]]
    sweep_all(a.data_dir, t)
    assert reserve() == []
    filler = a.data_dir / "filler.bin"
    free = durable.free_mb(a.data_dir)
    with open(filler, "wb") as f:
        f.write(b"\0" * int((free - 2) * 1024 * 1024))  # 2 MiB left, under the 4 MiB reserve
    for dt in (40, 100):
        sweep_all(a.data_dir, t + dt)
    assert reserve() == []  # under 2 minutes: nobody is paged for a blip
    for dt in (170, 400, 1200, 2400):
        sweep_all(a.data_dir, t + dt)
    assert len(reserve()) == 1 and reserve()[0].startswith("[Auth Test Site] Health alert: free")
    filler.unlink()
    for dt in (2500, 2600, 3000):
        sweep_all(a.data_dir, t + dt)
    assert len(reserve()) == 2 and "Cleared: free disk" in reserve()[1]
    others = [m["Subject"] for m in smtp.box.messages if "DICOM port" in m["Subject"]]
    assert len(others) == 1  # a condition that lasts is not repeated within the hour
