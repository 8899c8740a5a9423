"""Forwarding under faults, against a real Orthanc: the PACS goes away mid-forward and comes
back, the worker is killed with -9 during a 300-instance forward, one SOP class is refused.
After each, Orthanc holds every instance exactly once and nothing is left ``sending``."""

from __future__ import annotations

import collections
import signal
import time

from conftest import Site
from dicom_data import write_series
from forwarding_site import (
    FAR,
    complete,
    forwarding_site,
    ingest,
    pacs_sop_uids,
    sign_report,
    store_files,
)

from appliance.core import audit, db, leases
from appliance.forwarding import outbox, sending


def _states(conn) -> dict[str, int]:
    return dict(conn.execute("SELECT state, COUNT(*) FROM forward_outbox GROUP BY state"))


def test_the_pacs_stopped_mid_forward_then_started_gets_everything_once(tmp_path, pacs):
    site, cfg = forwarding_site(tmp_path, pacs, batch=10, retry_min_s=1, retry_max_s=8)
    study_uid, paths = ingest(site, 30)
    complete(cfg)
    conn = db.connect(cfg.db_path)
    owner = leases.new_owner()
    first = outbox.lease(conn, "SITEPACS", owner, FAR, 120, 10)
    assert sending.send_batch(conn, cfg, cfg.known_ae("SITEPACS"), first, owner,
                              lambda: FAR)["stored"] == 10  # a third is across …
    pacs.stop(kill=True)  # … when the PACS dies
    t, gaps = FAR, []
    for _ in range(6):  # 60 s of outage on the fake clock: retries with a doubling delay
        assert sending.run_due(cfg, now=t)["stored"] == 0
        due = conn.execute("SELECT MIN(next_attempt_at) FROM forward_outbox WHERE"
                           " state = 'waiting'").fetchone()[0]
        gaps.append(due - t)
        t = due
    assert gaps == [1, 2, 4, 8, 8, 8]
    row = conn.execute("SELECT last_error FROM forward_outbox WHERE state = 'waiting'"
                       " LIMIT 1").fetchone()
    assert row[0].startswith(f"SITEPACS at 127.0.0.1:{pacs.dicom_port} ")
    assert _states(conn) == {"delivered": 10, "waiting": 20}

    pacs.start()
    assert sending.run_due(cfg, now=t)["stored"] == 20
    assert _states(conn) == {"delivered": 30}
    held = pacs_sop_uids(pacs)
    assert len(held) == len(set(held)) == 30
    assert set(held) == {r["sop_uid"] for r in outbox.study_rows(conn, study_uid)}


def test_a_refused_sop_class_is_failed_once_and_the_rest_arrives(tmp_path, pacs):
    """Orthanc accepts no presentation context for a SOP class it does not know."""
    site, cfg = forwarding_site(tmp_path, pacs)
    study_uid, _series, paths = write_series(tmp_path / "odd", 3)
    import pydicom

    odd = pydicom.dcmread(paths[0])
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.9.9999.1"
    odd.save_as(paths[0], enforce_file_format=True)
    store_files(site, paths)
    complete(cfg)
    conn = db.connect(cfg.db_path)
    assert sending.run_due(cfg, now=FAR) == {"stored": 2, "refused": 1, "retry": 0}
    assert sending.run_due(cfg, now=FAR + 3600) == {"stored": 0, "refused": 0, "retry": 0}
    rows = outbox.study_rows(conn, study_uid)
    failed = [r for r in rows if r["state"] == "failed"]
    assert [r["sop_uid"] for r in failed] == [odd.SOPInstanceUID]
    assert "SOP class not supported" in failed[0]["last_error"]
    assert sorted(r["state"] for r in rows) == ["delivered", "delivered", "failed"]
    refusals = [r for r in audit.rows(conn) if r["action"] == "forward.refused"]
    assert [(r["object"], r["outcome"]) for r in refusals] == [(odd.SOPInstanceUID, "failed")]
    assert len(pacs.instances()) == 2
    _report_page_shows_the_refusal(cfg, conn, study_uid)


def _report_page_shows_the_refusal(cfg, conn, study_uid: str) -> None:
    """The study's signed report, as site staff open it, says what did not reach the PACS."""
    from test_auth import HTML, PASSWORD, post_login

    from appliance.accounts import users as accounts
    from appliance.app import create_app

    rid = sign_report(conn, cfg, study_uid, findings="Normal.")
    accounts.add_user(conn, "clerk", "site_staff", PASSWORD)
    client = create_app(cfg, {"TESTING": True}).test_client()
    client.environ_base.update({"wsgi.url_scheme": "https", "REMOTE_ADDR": "127.0.0.1"})
    assert post_login(client, "clerk", PASSWORD).status_code == 302
    page = client.get(f"/reports/{rid}", headers=HTML)
    text = page.get_data(as_text=True)
    assert page.status_code == 200, text
    line = text[text.index('data-testid="forwarding"'):]
    line = line[:line.index("</p>")]
    assert "SITEPACS" in line and "2 delivered" in line and "1 failed" in line, line
    assert "refused for good" in line and "SOP class not supported" in line, line


def test_kill_9_of_the_worker_during_a_300_instance_forward_loses_and_doubles_nothing(
        tmp_path, pacs):
    site, cfg = forwarding_site(tmp_path, pacs, batch=60)  # three associations of 20
    path = site.data_dir / "appliance.yaml"
    path.write_text(path.read_text().replace("  quiet_period_s: 30", "  quiet_period_s: 0.2")
                    .replace("  sweep_interval_s: 2", "  sweep_interval_s: 0.2"))
    study_uid, _ = ingest(site, 300, rows=96, cols=96)
    conn = db.connect(cfg.db_path)
    runner = Site(site.data_dir, 0, 0, "")
    kills = 0
    try:
        for threshold in (30, 80, 130, 180, 230):  # five kills, each mid-forward
            runner.start("worker")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                done = conn.execute("SELECT COUNT(*) FROM forward_outbox WHERE state IN"
                                    " ('stored', 'delivered')").fetchone()[0]
                if done >= threshold:
                    break
                time.sleep(0.01)
            runner.stop("worker", signal.SIGKILL)
            kills += 1
            assert done < 300, "the forward ended before the kill"
        runner.start("worker")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and _states(conn) != {"delivered": 300}:
            time.sleep(0.1)
    finally:
        runner.stop_all()
    assert kills == 5
    assert _states(conn) == {"delivered": 300}  # nothing left sending
    held = collections.Counter(pacs_sop_uids(pacs))
    assert len(held) == 300 and set(held.values()) == {1}
    assert set(held) == {r["sop_uid"] for r in outbox.study_rows(conn, study_uid)}
