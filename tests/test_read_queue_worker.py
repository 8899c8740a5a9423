"""The real processes: studies pushed with dcmtk storescu, ``appliance worker`` killed with
SIGKILL in the middle of the batch and restarted; then every study has exactly one read item
and every due escalation fired exactly once. And a workflow edited while the worker runs:
reloaded within 10 s, a broken edit rejected with the last good version kept."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Site
from dicom_data import write_series

from appliance.accounts import users as accounts

FAST_WORKFLOW = """\
# Test workflow: a 15 s SLA so the whole ladder runs during the test.
workflow: fast
pools:
  rads: {role: radiologist}
rules:
  - name: everything
    default: true
    priority: stat
    sla_minutes: 0.25
    pool: rads
    escalation:
      - {at: 0.2, action: notify_pool}
      - {at: 0.5, action: notify_pool}
      - {at: 1.0, action: mark_breached}
"""


def fast_site(site: Site, workflow: str = FAST_WORKFLOW) -> None:
    cfg = site.data_dir / "appliance.yaml"
    text = cfg.read_text().replace("quiet_period_s: 30", "quiet_period_s: 1")
    cfg.write_text(text.replace("sweep_interval_s: 2", "sweep_interval_s: 0.5"))
    for old in (site.data_dir / "workflows").glob("*.yaml"):
        old.unlink()
    (site.data_dir / "workflows" / "fast.yaml").write_text(workflow)
    conn = site.db()
    try:
        accounts.add_user(conn, "dr.kill", "radiologist", "correct-horse-battery")
    finally:
        conn.close()


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll another process's durable state (the database) until ``check`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def push(dcmtk: dict, site: Site, folder: Path) -> None:
    subprocess.run([dcmtk["storescu"], "-aet", "SCANNER", "-aec", site.ae_title, "127.0.0.1",
                    str(site.dicom_port), "+sd", str(folder)], check=True, capture_output=True,
                   env={**os.environ, "TCP_NODELAY": "1"}, timeout=60)


def scalar(site: Site, sql: str, *args):
    conn = site.db()
    try:
        return conn.execute(sql, args).fetchone()[0]
    finally:
        conn.close()


def test_worker_killed_mid_batch_loses_and_duplicates_nothing(site: Site, dcmtk, tmp_path):
    fast_site(site)
    folders = []
    for i in range(10):
        write_series(tmp_path / f"s{i}", 3, rows=16, cols=16, patient_id=f"P{i}")
        folders.append(tmp_path / f"s{i}")
    site.start_dicom()
    site.start("worker")
    for folder in folders[:4]:
        push(dcmtk, site, folder)
    wait_until("a first read item", lambda: scalar(site, "SELECT COUNT(*) FROM read_items") > 0,
               20)
    site.stop("worker", signal.SIGKILL)  # mid-batch: items made, steps pending, more coming
    at_kill = scalar(site, "SELECT COUNT(*) FROM read_items")
    for folder in folders[4:]:
        push(dcmtk, site, folder)
    assert scalar(site, "SELECT COUNT(*) FROM studies") == 10
    assert scalar(site, "SELECT COUNT(*) FROM read_items") == at_kill  # nobody sweeping
    site.start("worker")
    for pause in (0.7, 1.1, 0.9):  # and again while it catches up: kill at arbitrary lines
        time.sleep(pause)  # the point is an arbitrary moment, not an event to wait for
        site.stop("worker", signal.SIGKILL)
        site.start("worker")
    wait_until("ten read items", lambda: scalar(site, "SELECT COUNT(*) FROM read_items") == 10,
               30)
    wait_until("every escalation step fired", lambda: scalar(
        site, "SELECT COUNT(*) FROM escalation_steps WHERE fired_at IS NULL") == 0, 40)

    conn = site.db()
    try:
        per_study = conn.execute("SELECT s.study_uid, COUNT(r.id) AS n FROM studies s LEFT JOIN"
                                 " read_items r USING (study_uid) GROUP BY s.study_uid").fetchall()
        assert [r["n"] for r in per_study] == [1] * 10
        steps = conn.execute("SELECT id, fire_at, fired_at FROM escalation_steps").fetchall()
        assert len(steps) == 30 and all(s["fired_at"] >= s["fire_at"] for s in steps)
        sent = conn.execute("SELECT step_id, COUNT(*) AS n FROM notifications"
                            " WHERE step_id IS NOT NULL GROUP BY step_id").fetchall()
        assert sorted(r["step_id"] for r in sent) == sorted(s["id"] for s in steps)
        assert all(r["n"] == 1 for r in sent), "an escalation fired twice"
        assert conn.execute("SELECT COUNT(*) FROM read_items WHERE breached = 1").fetchone()[0] \
            == 10
        assert conn.execute("SELECT COUNT(*) FROM pending_completions").fetchone()[0] == 0
        fired = conn.execute("SELECT COUNT(*) FROM audit WHERE action LIKE"
                             " 'read_item.escalation.%'").fetchone()[0]
        assert fired == 30
    finally:
        conn.close()


def test_workflow_edit_reloaded_within_10_s_and_bad_edit_rejected(site: Site, dcmtk, tmp_path):
    fast_site(site)
    path = site.data_dir / "workflows" / "fast.yaml"
    site.start_dicom()
    site.start("worker")
    wait_until("the workflow loaded", lambda: scalar(
        site, "SELECT COUNT(*) FROM workflow_files WHERE active_sha IS NOT NULL") == 1, 15)
    first_sha = scalar(site, "SELECT active_sha FROM workflow_files")

    path.write_text(FAST_WORKFLOW.replace("sla_minutes: 0.25", "sla_minutes: 45"))
    edited = time.monotonic()
    wait_until("the edit in force", lambda: scalar(
        site, "SELECT active_sha FROM workflow_files") != first_sha, 10)
    assert time.monotonic() - edited < 10
    good_sha = scalar(site, "SELECT active_sha FROM workflow_files")

    path.write_text(FAST_WORKFLOW.replace("pool: rads", "pool: radiologists"))
    wait_until("the bad edit rejected", lambda: scalar(
        site, "SELECT COUNT(*) FROM workflow_files WHERE last_error IS NOT NULL") == 1, 10)
    assert scalar(site, "SELECT active_sha FROM workflow_files") == good_sha
    error = scalar(site, "SELECT last_error FROM workflow_files")
    assert error == f"{path}:10:11: rule 'everything': unknown pool 'radiologists' (pools: rads)"
    log = (site.data_dir / "logs" / "worker.log").read_text()
    assert "workflow edit rejected" in log and "unknown pool 'radiologists'" in log

    write_series(tmp_path / "s", 2, rows=16, cols=16)
    push(dcmtk, site, tmp_path / "s")
    wait_until("its read item", lambda: scalar(site, "SELECT COUNT(*) FROM read_items") == 1, 15)
    assert scalar(site, "SELECT sla_minutes FROM read_items") == 45  # the last good version
    status = site.cli("workflow", "status")
    assert status.returncode == 1 and "unknown pool 'radiologists'" in status.stdout
