"""The read queue under a fake clock: completion, late instances, claims, every escalation step,
hot reload with last-good semantics, turnaround metrics, and ``appliance workflow explain``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from dicom_data import make_instance, write_series
from pydicom.uid import generate_uid

from appliance.accounts import users as accounts
from appliance.core import audit, config, db, notifications
from appliance.reading import read_queue, worklist
from dicom_node import index as idx

T0 = 1_780_000_000.0  # a fixed epoch for the fake clock
QUIET = 30.0
LIBRARY = ROOT / "workflows" / "library"


def index_study(conn, study_uid: str | None = None, n: int = 3, at: float = T0,
                step: float = 1.0, **kw) -> str:
    """Index ``n`` instances as the study store would, received at fake times."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    calling_ae = kw.pop("calling_ae", "CT1")
    for i in range(n):
        ds = make_instance(study_uid, series_uid, i, rows=8, cols=8, **kw)
        st, se, inst = idx.attributes(ds)
        rec = idx.InstanceRecord(
            study_uid=study_uid, series_uid=series_uid, sop_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID, transfer_syntax=ds.file_meta.TransferSyntaxUID,
            path=f"x/{ds.SOPInstanceUID}.dcm", size=100, sha256="0" * 64,
            received_at=at + i * step, calling_ae=calling_ae, study=st, series=se,
            instance=inst)
        with db.transaction(conn):
            idx.insert(conn, rec)
    return study_uid


class QueueSite:
    """A data directory with config, database, workflows and readers; no processes."""

    def __init__(self, base: Path):
        self.data_dir = base / "site"
        (self.data_dir / "workflows").mkdir(parents=True)
        (self.data_dir / "logs").mkdir()
        (self.data_dir / config.CONFIG_NAME).write_text(
            config.render_default("Queue test", "q", "FIELDAPP", 11112, 8443))
        self.cfg = config.load(self.data_dir)
        self.conn = db.open_db(self.cfg.db_path)
        read_queue._SETS.clear()  # a fresh worker process

    def use(self, *names: str) -> None:
        for name in names:
            shutil.copy(LIBRARY / name, self.cfg.workflows_dir / name)

    def reader(self, name: str, role: str = "radiologist", tags: str = "") -> dict:
        accounts.add_user(self.conn, name, role, "correct-horse-battery", tags=tags)
        return dict(self.conn.execute("SELECT id, username, role, tags FROM users"
                                      " WHERE username = ?", (name,)).fetchone())

    def store(self, study_uid: str | None = None, n: int = 3, at: float = T0, step: float = 1.0,
              **kw) -> str:
        return index_study(self.conn, study_uid, n, at, step, **kw)

    def sweep(self, now: float) -> dict:
        return read_queue.sweep(self.cfg, now=now)

    def item(self, study_uid: str) -> dict:
        return worklist.item_for_study(self.conn, study_uid)

    def count(self, sql: str, *args) -> int:
        return self.conn.execute(sql, args).fetchone()[0]


@pytest.fixture
def qs(tmp_path: Path):
    s = QueueSite(tmp_path)
    yield s
    s.conn.close()


# -- completion -------------------------------------------------------------------------------
def test_study_complete_after_quiet_period_gets_one_item(qs: QueueSite):
    qs.use("disaster-default.yaml")
    uid = qs.store(n=3, at=T0, body_part="CHEST", study_description="CT CHEST")  # routine
    assert qs.sweep(T0 + 2 + QUIET - 0.5)["created"] == 0  # routine waits for completion
    assert qs.item(uid) is None
    counts = qs.sweep(T0 + 2 + QUIET)
    assert (counts["created"], counts["completed"]) == (1, 1)
    item = qs.item(uid)
    assert (item["priority"], item["sla_minutes"], item["rule"]) == ("routine", 60, "routine")
    assert item["due_at"] == T0 + 60 * 60  # first instance + SLA
    assert item["state"] == "queued" and item["modalities"] == ["CT"] and not item["arriving"]
    assert [e["action"] for e in item["escalations"]] == [
        "notify_pool", "notify_on_call", "mark_breached"]
    assert [e["fire_at"] - T0 for e in item["escalations"]] == pytest.approx([1800, 3000, 3600])
    for t in (T0 + 40, T0 + 50):  # repeated sweeps change nothing
        assert qs.sweep(t) == {"created": 0, "completed": 0, "late": 0, "claims_expired": 0,
                               "escalations": 0}
    assert qs.count("SELECT COUNT(*) FROM read_items") == 1
    assert [h["event"] for h in worklist.history(qs.conn, item["id"])] == ["created", "complete"]


def test_a_stat_study_is_listed_while_it_arrives_and_keeps_one_item(qs: QueueSite):
    qs.use("disaster-default.yaml")
    uid = qs.store(n=1, at=T0)  # the first image of a CT head
    assert qs.sweep(T0 + 1)["created"] == 1  # long before the quiet period
    item = qs.item(uid)
    assert item["arriving"] and item["num_instances"] == 1 and item["state"] == "queued"
    assert (item["priority"], item["rule"], item["due_at"]) == ("stat", "ct-head-stat",
                                                                T0 + 30 * 60)
    assert [e["fire_at"] - T0 for e in item["escalations"]] == pytest.approx(
        [900, 1350, 1620, 1800])  # the SLA clock runs from the first image
    qs.store(uid, n=4, at=T0 + 2)  # more arrive: the count rises, nothing is late
    assert qs.sweep(T0 + 7)["created"] == 0
    item = qs.item(uid)
    assert item["arriving"] and item["instances_seen"] == 5 and not item["late"]
    assert qs.sweep(T0 + 5 + QUIET - 0.5)["completed"] == 0
    counts = qs.sweep(T0 + 5 + QUIET)
    assert (counts["created"], counts["completed"], counts["late"]) == (0, 1, 0)
    item = qs.item(uid)
    assert not item["arriving"] and not item["late"] and item["num_instances"] == 5
    assert qs.sweep(T0 + 100)["completed"] == 0  # completion runs once
    qs.store(uid, n=2, at=T0 + 200)  # after completion: late images, same item
    assert qs.sweep(T0 + 201)["late"] == 1
    assert qs.item(uid)["late_instances"] == 2
    assert qs.count("SELECT COUNT(*) FROM read_items") == 1
    assert [h["event"] for h in worklist.history(qs.conn, item["id"])] == [
        "created", "complete", "late_instances"]


def test_images_after_a_report_on_an_arriving_study_are_late(qs: QueueSite):
    qs.use("disaster-default.yaml")
    rad = qs.reader("dr.early")
    uid = qs.store(n=2, at=T0)
    qs.sweep(T0 + 2)
    item_id = qs.item(uid)["id"]
    worklist.claim(qs.conn, item_id, rad, T0 + 3)
    worklist.transition(qs.conn, item_id, "preliminary", rad, T0 + 60)  # read what arrived
    qs.store(uid, n=3, at=T0 + 61)
    assert qs.sweep(T0 + 64)["late"] == 1  # still arriving, but the reader has answered
    item = qs.item(uid)
    assert item["arriving"] and item["late_instances"] == 3
    assert notifications.inbox(qs.conn, "dr.early")[0]["kind"] == "late_instances"
    assert qs.sweep(T0 + 64 + QUIET)["completed"] == 1
    assert qs.item(uid)["late_instances"] == 3  # completion adds no second count


REROUTE_WORKFLOW = """\
workflow: reroute
pools:
  rads: {role: radiologist}
  neuro: {role: neurologist}
rules:
  - name: stroke-cta
    match: {series_description: "CTA"}
    priority: stat
    sla_minutes: 20
    pool: neuro
  - name: ct-head
    match: {modality: CT, body_part: HEAD}
    priority: stat
    sla_minutes: 30
    pool: rads
  - name: routine
    default: true
    priority: routine
    sla_minutes: 60
    pool: rads
"""


def test_completion_reroutes_a_stat_study_its_later_series_changed(qs: QueueSite):
    (qs.cfg.workflows_dir / "reroute.yaml").write_text(REROUTE_WORKFLOW)
    uid = qs.store(n=1, at=T0, series_description="NON CONTRAST")
    qs.sweep(T0 + 1)
    assert qs.item(uid)["rule"] == "ct-head" and qs.item(uid)["arriving"]
    qs.store(uid, n=2, at=T0 + 10, series_description="CTA HEAD NECK")
    assert qs.sweep(T0 + 11 + QUIET)["completed"] == 1
    item = qs.item(uid)
    assert (item["rule"], item["pool"]["name"], item["due_at"]) == ("stroke-cta", "neuro",
                                                                    T0 + 20 * 60)
    assert [e["fire_at"] - T0 for e in item["escalations"]] == [600, 1200]  # the new ladder
    assert qs.count("SELECT COUNT(*) FROM read_items") == 1
    assert "rerouted" in [h["event"] for h in worklist.history(qs.conn, item["id"])]


def test_late_instances_attach_to_the_same_item_and_are_flagged(qs: QueueSite):
    qs.use("disaster-default.yaml")
    rad = qs.reader("dr.late")
    uid = qs.store(n=2, at=T0, body_part="CHEST", study_description="CT CHEST")
    qs.sweep(T0 + 60)
    item = qs.item(uid)
    worklist.claim(qs.conn, item["id"], rad, T0 + 70)
    qs.store(uid, n=4, at=T0 + 300, body_part="CHEST", study_description="CT CHEST")
    counts = qs.sweep(T0 + 305)  # no quiet period needed to flag a late arrival
    assert counts == {"created": 0, "completed": 0, "late": 1, "claims_expired": 0,
                      "escalations": 0}
    item = qs.item(uid)
    assert item["late"] and item["late_instances"] == 4 and item["num_instances"] == 6
    assert qs.count("SELECT COUNT(*) FROM read_items") == 1
    inbox = notifications.inbox(qs.conn, "dr.late")
    assert inbox[0]["kind"] == "late_instances" and inbox[0]["item_id"] == item["id"]
    assert "late_instances" in [h["event"] for h in worklist.history(qs.conn, item["id"])]


def test_a_study_still_arriving_waits(qs: QueueSite):
    uid = qs.store(n=5, at=T0, step=20.0)  # one image every 20 s: never quiet for 30 s
    for t in (T0 + 25, T0 + 45, T0 + 70):
        qs.sweep(t)
    assert qs.item(uid) is None
    qs.sweep(T0 + 80 + QUIET)
    assert qs.item(uid)["rule"] == "built-in-fallback"  # no workflow file: still routed


# -- claims ---------------------------------------------------------------------------------------
def test_claims_lock_expire_and_are_audited(qs: QueueSite):
    qs.use("disaster-default.yaml")
    a, b = qs.reader("dr.a"), qs.reader("dr.b")
    neuro = qs.reader("dr.n", role="neurologist")
    uid = qs.store(at=T0)
    qs.sweep(T0 + 60)
    item_id = qs.item(uid)["id"]
    with pytest.raises(worklist.NotAllowed):
        worklist.claim(qs.conn, item_id, neuro, T0 + 100)  # pool radiologists only
    got = worklist.claim(qs.conn, item_id, a, T0 + 100, lease_s=1200)
    assert got["claimed_by"] == "dr.a" and got["claim_expires_at"] == T0 + 1300
    with pytest.raises(worklist.Conflict, match="claimed by dr.a"):
        worklist.claim(qs.conn, item_id, b, T0 + 200)
    with pytest.raises(worklist.NotAllowed):
        worklist.release(qs.conn, item_id, b, T0 + 200)
    assert worklist.renew(qs.conn, item_id, a, T0 + 1000)["claim_expires_at"] == T0 + 2200
    assert qs.sweep(T0 + 2199)["claims_expired"] == 0
    assert qs.sweep(T0 + 2200)["claims_expired"] == 1
    item = qs.item(uid)
    assert item["state"] == "queued" and item["claimed_by"] is None
    with pytest.raises(worklist.Conflict, match="not claimed"):
        worklist.renew(qs.conn, item_id, a, T0 + 2300)
    expired = [r for r in audit.rows(qs.conn) if r["action"] == "read_item.claim_expired"]
    assert len(expired) == 1 and expired[0]["detail"]["reader"] == "dr.a"
    worklist.claim(qs.conn, item_id, b, T0 + 2400)
    worklist.release(qs.conn, item_id, b, T0 + 2500, reason="wrong specialty")
    events = [h["event"] for h in worklist.history(qs.conn, item_id)]
    assert [e for e in events if not e.startswith("escalation.")] == [
        "created", "complete", "claimed", "renewed", "claim_expired", "claimed", "released"]
    assert audit.verify(qs.conn)[0]


def test_lapsed_claim_is_taken_over_by_the_next_reader(qs: QueueSite):
    a, b = qs.reader("dr.a"), qs.reader("dr.b")
    uid = qs.store(at=T0)
    qs.sweep(T0 + 60)
    item_id = qs.item(uid)["id"]
    worklist.claim(qs.conn, item_id, a, T0 + 100, lease_s=60)
    got = worklist.claim(qs.conn, item_id, b, T0 + 161)  # before any sweep noticed
    assert got["claimed_by"] == "dr.b"
    assert [h["event"] for h in worklist.history(qs.conn, item_id)][-2:] == [
        "claim_expired", "claimed"]


def test_state_machine(qs: QueueSite):
    a = qs.reader("dr.a")
    admin = qs.reader("resp", role="responder")
    uid = qs.store(at=T0)
    qs.sweep(T0 + 60)
    item_id = qs.item(uid)["id"]
    with pytest.raises(worklist.Conflict, match="use claim/release"):
        worklist.transition(qs.conn, item_id, "claimed", a, T0 + 70)
    with pytest.raises(worklist.Conflict, match="from queued to final"):
        worklist.transition(qs.conn, item_id, "final", a, T0 + 70)
    worklist.claim(qs.conn, item_id, a, T0 + 70)
    with pytest.raises(worklist.NotAllowed):
        worklist.transition(qs.conn, item_id, "cancelled", a, T0 + 80)
    worklist.transition(qs.conn, item_id, "preliminary", a, T0 + 600)
    worklist.transition(qs.conn, item_id, "final", a, T0 + 900)
    item = worklist.transition(qs.conn, item_id, "delivered", "system:report-delivery", T0 + 901)
    assert item["state"] == "delivered" and item["read_at"] == T0 + 600
    with pytest.raises(worklist.Conflict):
        worklist.transition(qs.conn, item_id, "cancelled", admin, T0 + 902)
    hist = worklist.history(qs.conn, item_id)
    assert [(h["from_state"], h["to_state"], h["actor"]) for h in hist[-3:]] == [
        ("claimed", "preliminary", "dr.a"), ("preliminary", "final", "dr.a"),
        ("final", "delivered", "system:report-delivery")]


def test_hold_for_triage_blocks_claims_until_released(qs: QueueSite, tmp_path: Path):
    (qs.cfg.workflows_dir / "hold.yaml").write_text(
        "workflow: hold\npools:\n  r: {role: radiologist}\nrules:\n"
        "  - name: everything\n    default: true\n    priority: urgent\n    sla_minutes: 45\n"
        "    pool: r\n    actions:\n      - hold: true\n")
    a = qs.reader("dr.a")
    qs.reader("resp", role="responder")
    uid = qs.store(at=T0)
    qs.sweep(T0 + 60)
    item = qs.item(uid)
    assert item["hold"]
    assert notifications.inbox(qs.conn, "resp")[0]["kind"] == "triage"
    with pytest.raises(worklist.Conflict, match="manual triage"):
        worklist.claim(qs.conn, item["id"], a, T0 + 70)
    worklist.release_hold(qs.conn, item["id"], "resp", T0 + 80)
    assert worklist.claim(qs.conn, item["id"], a, T0 + 90)["state"] == "claimed"


# -- escalation ------------------------------------------------------------------------------------
def test_every_escalation_step_fires_once_at_its_time(qs: QueueSite):
    qs.use("disaster-default.yaml")
    qs.reader("dr.a")
    qs.reader("dr.b")
    qs.reader("dr.n", role="neurologist")
    qs.reader("admin", role="admin")  # on call: duty-radiologist = [admin]
    uid = qs.store(at=T0)  # CT head: STAT, 30 min
    qs.sweep(T0 + 60)
    item_id = qs.item(uid)["id"]

    def kinds(user: str) -> list[str]:
        return [n["kind"] for n in reversed(notifications.inbox(qs.conn, user))]

    assert qs.sweep(T0 + 899)["escalations"] == 0
    assert qs.sweep(T0 + 900)["escalations"] == 1  # 0.5: the pool
    assert kinds("dr.a") == kinds("dr.b") == ["escalation"] and kinds("dr.n") == []
    assert qs.sweep(T0 + 1349)["escalations"] == 0
    assert qs.sweep(T0 + 1350)["escalations"] == 1  # 0.75: on call
    assert kinds("admin") == ["escalation.on_call"]
    assert qs.sweep(T0 + 1620)["escalations"] == 1  # 0.9: reopen to all readers
    item = qs.item(uid)
    assert item["pool"]["name"] == "all-readers" and "neurologist" in item["pool"]["roles"]
    assert kinds("dr.n") == ["escalation.reopened"]
    assert not item["breached"]
    assert qs.sweep(T0 + 1800)["escalations"] == 1  # 1.0: breached
    item = qs.item(uid)
    assert item["breached"] and item["breached_at"] == T0 + 1800
    assert kinds("dr.n")[-1] == "breach"
    for t in (T0 + 1801, T0 + 5000, T0 + 99999):
        assert qs.sweep(t)["escalations"] == 0
    fired = qs.conn.execute("SELECT fire_at, fired_at FROM escalation_steps WHERE item_id = ?",
                            (item_id,)).fetchall()
    assert all(r["fired_at"] == r["fire_at"] for r in fired)
    per_step = qs.conn.execute("SELECT step_id, username, COUNT(*) FROM notifications"
                               " WHERE step_id IS NOT NULL GROUP BY step_id, username"
                               " HAVING COUNT(*) > 1").fetchall()
    assert per_step == []
    assert worklist.list_items(qs.conn, breached=True)[0]["id"] == item_id


def test_a_backlog_fires_each_overdue_step_once(qs: QueueSite):
    qs.use("disaster-default.yaml")
    qs.reader("dr.a")
    uids = [qs.store(at=T0 + i) for i in range(5)]
    counts = qs.sweep(T0 + 7200)  # the worker was down for two hours
    assert counts["created"] == 5 and counts["escalations"] == 5 * 4
    assert all(qs.item(u)["breached"] for u in uids)
    assert qs.sweep(T0 + 7300)["escalations"] == 0


def test_a_claimed_study_reminds_its_reader_not_the_pool(qs: QueueSite):
    qs.use("disaster-default.yaml")
    a = qs.reader("dr.a")
    qs.reader("dr.b")
    uid = qs.store(at=T0)
    qs.sweep(T0 + 60)
    worklist.claim(qs.conn, qs.item(uid)["id"], a, T0 + 100, lease_s=3600)
    assert qs.sweep(T0 + 900)["escalations"] == 1
    assert [n["kind"] for n in notifications.inbox(qs.conn, "dr.a")] == ["escalation.reminder"]
    assert notifications.inbox(qs.conn, "dr.b") == []


def test_a_read_study_does_not_escalate(qs: QueueSite):
    qs.use("disaster-default.yaml")
    a = qs.reader("dr.a")
    uid = qs.store(at=T0, body_part="CHEST", study_description="CT CHEST")  # routine 60 min
    qs.sweep(T0 + 60)
    item_id = qs.item(uid)["id"]
    worklist.claim(qs.conn, item_id, a, T0 + 120)
    worklist.transition(qs.conn, item_id, "preliminary", a, T0 + 1200)
    assert qs.sweep(T0 + 9999)["escalations"] == 0
    item = qs.item(uid)
    assert not item["breached"] and all(e["skipped_at"] for e in item["escalations"])
    assert notifications.inbox(qs.conn, "dr.a") == []


def test_read_after_due_with_no_sweep_is_still_breached(qs: QueueSite):
    a = qs.reader("dr.a")
    uid = qs.store(at=T0)  # built-in fallback: routine, 60 min
    qs.sweep(T0 + 60)
    item_id = qs.item(uid)["id"]
    worklist.claim(qs.conn, item_id, a, T0 + 3000)
    item = worklist.transition(qs.conn, item_id, "final", a, T0 + 4000)  # worker down
    assert item["breached"] and item["breached_at"] == T0 + 3600
    assert qs.sweep(T0 + 4001)["escalations"] == 0


def test_an_empty_pool_escalates_to_responders(qs: QueueSite):
    qs.use("teleneurology-stroke.yaml")
    qs.reader("resp", role="responder")
    qs.reader("dr.n", role="neurologist")  # no "neuro" tag: not in the stroke pool
    qs.store(at=T0, study_description="CODE STROKE CT HEAD")
    qs.sweep(T0 + 60)
    qs.sweep(T0 + 0.25 * 1800)
    assert notifications.inbox(qs.conn, "dr.n") == []
    assert notifications.inbox(qs.conn, "resp")[0]["kind"] == "escalation.unrouted"


# -- hot reload -------------------------------------------------------------------------------------
def test_workflow_edit_reloaded_and_a_bad_edit_keeps_the_last_good(qs: QueueSite):
    path = qs.cfg.workflows_dir / "site.yaml"
    good = (LIBRARY / "disaster-default.yaml").read_text()
    path.write_text(good)
    qs.sweep(T0)
    path.write_text(good.replace("sla_minutes: 60", "sla_minutes: 90"))
    qs.sweep(T0 + 1)
    routine = qs.store(at=T0 + 2, body_part="CHEST", study_description="CT CHEST")
    qs.sweep(T0 + 100)
    assert qs.item(routine)["sla_minutes"] == 90  # the edit is in force

    path.write_text(good.replace("sla_minutes: 60", "sla_minutes: sixty"))
    qs.sweep(T0 + 101)
    rejected = [r for r in audit.rows(qs.conn) if r["action"] == "workflow.rejected"]
    line = good.splitlines().index("    sla_minutes: 60") + 1
    assert len(rejected) == 1
    assert rejected[0]["detail"]["problems"][0] == (
        f"{path}:{line}:18: rule 'routine' sla_minutes: expected a number, got the text 'sixty'")
    qs.sweep(T0 + 102)  # the same broken file is not reported again
    assert sum(r["action"] == "workflow.rejected" for r in audit.rows(qs.conn)) == 1
    second = qs.store(at=T0 + 103, body_part="CHEST", study_description="CT CHEST")
    qs.sweep(T0 + 200)
    assert qs.item(second)["sla_minutes"] == 90  # last good version still applies

    read_queue._SETS.clear()  # the worker restarts while the file is still broken
    third = qs.store(at=T0 + 201, body_part="CHEST", study_description="CT CHEST")
    qs.sweep(T0 + 300)
    assert qs.item(third)["sla_minutes"] == 90
    status = run_cli("workflow", "status", "--data-dir", str(qs.data_dir))
    assert status.returncode == 1 and "last edit rejected" in status.stdout


# -- metrics and listing -----------------------------------------------------------------------------
def test_turnaround_counts_percentiles_and_share_within_sla(qs: QueueSite):
    qs.use("disaster-default.yaml")
    a = qs.reader("dr.a")
    uids = [qs.store(at=T0, body_part="CHEST", study_description="CT CHEST") for _ in range(4)]
    qs.sweep(T0 + 60)
    for uid, minutes in zip(uids, (10, 20, 50, 70), strict=True):
        item_id = qs.item(uid)["id"]
        worklist.claim(qs.conn, item_id, a, T0 + 60)
        worklist.transition(qs.conn, item_id, "final", a, T0 + minutes * 60)
    t = worklist.turnaround(qs.conn, T0, T0 + 86400)
    assert t["read"] == 4 and t["within_sla"] == 3 and t["within_sla_share"] == 0.75
    assert t["p50_minutes"] == 20 and t["p90_minutes"] == 70
    assert t["by_priority"]["routine"]["read"] == 4
    assert worklist.turnaround(qs.conn, T0 + 86400, T0 + 2 * 86400)["read"] == 0


def test_list_filters_and_due_order(qs: QueueSite):
    qs.use("disaster-default.yaml")
    chest = qs.store(at=T0, body_part="CHEST", study_description="CT CHEST")
    head = qs.store(at=T0 + 5)
    cr = qs.store(at=T0 + 10, modality="CR", body_part="CHEST")
    qs.sweep(T0 + 100)
    order = [i["study_uid"] for i in worklist.list_items(qs.conn)]
    assert order == [head, chest, cr]  # stat head due first
    assert [i["study_uid"] for i in worklist.list_items(qs.conn, modality="cr")] == [cr]
    assert [i["study_uid"] for i in worklist.list_items(qs.conn, priority="stat")] == [head]
    assert worklist.list_items(qs.conn, pool="nope") == []
    with pytest.raises(worklist.WorklistError):
        worklist.list_items(qs.conn, state="lost")
    neuro = {"role": "neurologist", "tags": ""}
    assert worklist.list_items(qs.conn, eligible_for=neuro) == []


# -- explain -------------------------------------------------------------------------------------
def test_explain_a_stored_study_and_files_not_yet_sent(qs: QueueSite, tmp_path: Path):
    qs.use("disaster-default.yaml", "teleneurology-stroke.yaml")
    uid = qs.store(at=T0, study_description="CODE STROKE CTA HEAD")
    r = run_cli("workflow", "explain", "--data-dir", str(qs.data_dir), "--study-uid", uid)
    assert r.returncode == 0, r.stderr
    line = (LIBRARY / "teleneurology-stroke.yaml").read_text().splitlines().index(
        "  - name: stroke-protocol") + 1
    assert f"teleneurology-stroke / stroke-protocol (line {line}): MATCHED" in r.stdout
    assert "✓ study description 'CODE STROKE CTA HEAD' matches" in r.stdout
    assert "priority stat, SLA 30 min" in r.stdout and "pool stroke-neuro" in r.stdout
    assert any(a["action"] == "workflow.explain" and a["object"] == uid
               for a in audit.rows(qs.conn))

    write_series(tmp_path / "incoming", 2, modality="CR", body_part="CHEST",
                 study_description="CHEST PA")
    r = run_cli("workflow", "explain", "--data-dir", str(qs.data_dir), "--dicom-dir",
                str(tmp_path / "incoming"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["result"]["rule"] == "routine" and out["result"]["sla_minutes"] == 60
    ct_head = next(t for t in out["rules"] if t["rule"] == "ct-head-stat")
    assert not ct_head["matched"] and "✗ modality CR is not one of CT" in ct_head["reasons"]

    r = run_cli("workflow", "explain", "--data-dir", str(qs.data_dir), "--study-uid", "1.2.3")
    assert r.returncode == 1 and r.stderr.startswith("error: no stored study")
