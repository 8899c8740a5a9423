"""The on-call rota in the workflow YAML under time-machine: at 21:00 on a Monday the night
doctor is paged, not acknowledged in 5 minutes the second person, then the pool; `appliance
workflow explain` says who would be paged now; a bad window is named by file:line."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
import time_machine
from notify_site import first_received, sweep_all
from reporting_site import ingest_study
from test_auth import make_auth_app

from appliance import cli
from appliance.core import notifications
from appliance.reading import worklist
from workflows.schema import WorkflowError, parse

ROTA = """\
workflow: night-rota
order: 10
pools:
  radiologists: {role: radiologist}
on_call:
  neuro-night:
    - {who: [dr.osei, dr.lind], days: [mon, tue, wed, thu, fri], from: "20:00", to: "08:00"}
    - {who: [dr.day], from: "08:00", to: "20:00"}
rules:
  - name: ct-head
    match: {modality: CT, body_part: HEAD}
    priority: stat
    sla_minutes: 30
    pool: radiologists
    escalation:
      - {at: 0.1, action: notify_on_call, on_call: neuro-night}
      - {at: 1.0, action: mark_breached}
"""
MONDAY_2057 = dt.datetime(2026, 12, 7, 20, 57, tzinfo=ZoneInfo("UTC"))


def _paged(a, since_id: int) -> list[str]:
    conn = a.db()
    try:
        return [n["username"] for n in notifications.after(conn, since_id)]
    finally:
        conn.close()


def _last_id(a) -> int:
    conn = a.db()
    try:
        return conn.execute("SELECT COALESCE(MAX(id), 0) FROM notifications").fetchone()[0]
    finally:
        conn.close()


def test_monday_night_pages_the_night_doctor_then_the_second_then_the_pool(tmp_path, capsys):
    with time_machine.travel(MONDAY_2057, tick=False):
        a = make_auth_app(tmp_path, yaml_edit=lambda t: t + "\nnotify:\n  health_alerts: false\n")
        (a.data_dir / "workflows" / "night-rota.yaml").write_text(ROTA)
        for name in ("dr.osei", "dr.lind", "dr.day", "dr.pool"):
            a.add_user(name, "radiologist")
        uid = ingest_study(a, 2, study_description="CT HEAD", body_part="HEAD")
        conn = a.db()
        t0 = first_received(conn, uid)
        conn.close()
        assert cli.main(["workflow", "explain", "--data-dir", str(a.data_dir),
                         "--study-uid", uid]) == 0
        out = capsys.readouterr().out
        assert "paged if it fired now: dr.osei, then dr.lind" in out
        sweep_all(a.data_dir, t0 + 31)
        mark = _last_id(a)
        sweep_all(a.data_dir, t0 + 3 * 60)  # 21:00: the on-call step fires
        assert _paged(a, mark) == ["dr.osei"]
        mark = _last_id(a)
        sweep_all(a.data_dir, t0 + 3 * 60 + 4 * 60)  # 4 min: still waiting for osei
        assert _paged(a, mark) == []
        sweep_all(a.data_dir, t0 + 3 * 60 + 5 * 60 + 1)  # 5 min unacknowledged (STAT)
        assert _paged(a, mark) == ["dr.lind"]
        mark = _last_id(a)
        sweep_all(a.data_dir, t0 + 3 * 60 + 10 * 60 + 2)  # then the pool (not osei/lind again)
        assert sorted(_paged(a, mark)) == ["dr.day", "dr.pool"]
        conn = a.db()
        item = worklist.item_for_study(conn, uid)
        steps = [h for h in worklist.history(conn, item["id"])
                 if h["event"] == "notify.unacknowledged"]
        conn.close()
        assert [s["detail"]["notified"] for s in steps] == [["dr.lind"], ["dr.day", "dr.pool"]]


def test_daytime_pages_the_day_doctor_and_bad_windows_name_file_and_line(tmp_path):
    with time_machine.travel(dt.datetime(2026, 12, 8, 10, 0, tzinfo=ZoneInfo("UTC")), tick=False):
        wf = parse(ROTA, "night-rota.yaml", ("radiologist",))
        from workflows.schema import on_duty

        step = wf.rules[0].escalation[0]
        assert on_duty(step.shifts, dt.datetime(2026, 12, 8, 10, 0)) == ("dr.day",)
        assert on_duty(step.shifts, dt.datetime(2026, 12, 8, 3, 0)) == ("dr.osei", "dr.lind")
        # Saturday 03:00 belongs to Friday night's shift; Sunday 03:00 to no night shift.
        assert on_duty(step.shifts, dt.datetime(2026, 12, 12, 3, 0)) == ("dr.osei", "dr.lind")
        assert on_duty(step.shifts, dt.datetime(2026, 12, 13, 3, 0)) == ()
    bad = ROTA.replace('from: "20:00", to: "08:00"', 'from: "25:00", to: "08:00"').replace(
        "days: [mon, tue", "days: [mon, tues")
    with pytest.raises(WorkflowError) as e:
        parse(bad, "night-rota.yaml", ("radiologist",))
    text = "\n".join(e.value.problems)
    assert "night-rota.yaml:7:" in text and "unknown day(s) tues" in text
    assert "'from' must be a time" in text
