"""Sync: the worker ships studies, late instances, reports and audit slices; priorities,
backoff, bandwidth timetable, the folder target, and a link that is down then up."""

from __future__ import annotations

import datetime as dt
import random
import re
import threading
import time

import pytest
from conftest import free_port
from test_sync_common import (
    BUCKET,
    age_identity,
    age_study,
    configure_sync,
    moto,
    set_sweep_interval,
    start_moto,
    store_study,
)

from appliance.core import config, db
from appliance.sync import building, outbox, status, upload
from appliance.sync import targets as st

__all__ = ["moto"]


def _wait(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _figures(site):
    conn = site.db()
    try:
        return status.figures(conn), status.reconcile(conn)
    finally:
        conn.close()


def test_worker_ships_a_study_then_only_its_late_instances(site, moto, tmp_path):
    pub = age_identity(tmp_path / "cloud.key")
    configure_sync(site, moto.url, [pub], audit_interval_s=1)
    set_sweep_interval(site, 0.3)
    study_uid, _ = store_study(site, tmp_path, 6)
    site.start("worker")
    _wait(lambda: _figures(site)[1]["unconfirmed"] == 0 and _figures(site)[1]["instances"] == 6,
          what="first bundle confirmed")
    # Late instances of the same study: a second bundle with those only.
    store_study(site, tmp_path, 3, study_uid=study_uid)
    _wait(lambda: _figures(site)[1] == {"unconfirmed": 0, "duplicated": 0, "instances": 9},
          what="late instances confirmed")
    conn = site.db()
    studies = conn.execute("SELECT b.bundle_id, COUNT(*) FROM bundles b JOIN bundle_items i"
                           " USING (bundle_id) WHERE b.kind='study' GROUP BY b.bundle_id"
                           " ORDER BY b.seq").fetchall()
    audits = conn.execute("SELECT COUNT(*) FROM bundles WHERE kind='audit' AND"
                          " state='confirmed'").fetchone()[0]
    conn.close()
    assert [r[1] for r in studies] == [6, 3]
    assert audits >= 1
    keys = [o["Key"] for o in moto.client().list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert len([k for k in keys if "-study-" in k]) == 2
    status = site.cli("sync", "status")
    assert status.returncode == 0 and "link: up" in status.stdout
    assert "instances not yet bundled: 0" in status.stdout
    # Secrets stay out of logs: the S3 secret never appears in any log line.
    for log in (site.data_dir / "logs").iterdir():
        assert "secret_access_key" not in log.read_text(errors="replace")


def _sync_cfg(site, url: str, pub: str, **extra):
    configure_sync(site, url, [pub], **extra)
    return config.load(site.data_dir)


def test_stat_study_preempts_a_routine_upload_at_a_part_boundary(site, moto, tmp_path):
    pub = age_identity(tmp_path / "cloud.key")
    # 5 MiB parts at 80 Mbit/s: a 40 MB routine bundle takes ~4 s.
    cfg = _sync_cfg(site, moto.url, pub, part_size_mb=5, bandwidth_kbit_s=80_000)
    routine, _ = store_study(site, tmp_path, 150, rows=256, cols=256,
                             study_description="CT ABDOMEN")
    age_study(site, routine)
    conn = db.connect(cfg.db_path)
    building.build_due(conn, cfg)
    up = upload.Uploader(cfg)
    t = threading.Thread(target=up.run)
    t.start()
    _wait(lambda: conn.execute("SELECT bytes_sent FROM bundles WHERE kind='study'")
          .fetchone()[0] > 0, what="routine upload started")
    stat, _ = store_study(site, tmp_path, 3, study_description="CT HEAD STROKE PROTOCOL")
    age_study(site, stat)
    building.build_due(conn, cfg)
    t.join(timeout=120)
    up.close()
    rows = {r["subject"]: r for r in conn.execute("SELECT * FROM bundles WHERE kind='study'")}
    conn.close()
    assert rows[stat]["priority"] == 0 and rows[routine]["priority"] == 2
    assert rows[stat]["state"] == rows[routine]["state"] == "confirmed"
    assert rows[stat]["confirmed_at"] < rows[routine]["confirmed_at"]
    puts = moto.part_puts()
    assert puts and max(puts.values()) == 1  # resumed after STAT without re-sending parts


def test_backoff_is_capped_exponential_with_jitter():
    rng = random.Random(7)
    for attempt, (lo, hi) in {1: (2.5, 5), 2: (5, 10), 3: (10, 20), 8: (300, 600),
                              30: (300, 600)}.items():
        values = [upload.backoff_s(attempt, rng) for _ in range(200)]
        assert lo <= min(values) and max(values) <= hi
        assert max(values) - min(values) > (hi - lo) / 3  # jittered, not one fixed delay


def test_bandwidth_timetable(site):
    path = site.data_dir / "appliance.yaml"
    path.write_text(path.read_text().replace(
        "  timetable: []",
        '  timetable: [{days: [mon, tue, wed, thu, fri], from: "08:00", to: "18:00", kbit_s: 512},'
        ' {from: "22:00", to: "06:00", kbit_s: 0}]').replace("bandwidth_kbit_s: 0",
                                                            "bandwidth_kbit_s: 2000"))
    cfg = config.load(site.data_dir)
    monday = dt.datetime(2026, 11, 30)
    assert upload.rate_kbit_s(cfg, monday.replace(hour=9)) == 512
    assert upload.rate_kbit_s(cfg, monday.replace(hour=19)) == 2000
    assert upload.rate_kbit_s(cfg, monday.replace(hour=23)) == 0  # night: unlimited
    assert upload.rate_kbit_s(cfg, monday.replace(hour=3)) == 0
    assert upload.rate_kbit_s(cfg, (monday + dt.timedelta(days=5)).replace(hour=9)) == 2000
    bad = path.read_text().replace('to: "18:00"', 'to: "18h"')
    path.write_text(bad)
    with pytest.raises(config.ConfigError, match="sync.timetable: entry 0"):
        config.load(site.data_dir)


def test_pacer_holds_the_rate():
    pacer = upload.Pacer(lambda: 8_000)  # 8 Mbit/s = 1 MB/s
    start = time.monotonic()
    for _ in range(20):
        pacer(50_000)  # 1 MB in all
    elapsed = time.monotonic() - start
    assert 0.7 <= elapsed <= 1.6, elapsed


def test_folder_target_resumes_and_never_overwrites(site, tmp_path):
    pub = age_identity(tmp_path / "usb.key")
    usb = tmp_path / "usb"
    usb.mkdir()
    path = site.data_dir / "appliance.yaml"
    text = path.read_text().replace("  target: none", "  target: folder").replace(
        '  folder: ""', f'  folder: "{usb}"').replace("  recipients: []", f"  recipients: [{pub}]")
    path.write_text(re.sub(r"(?m)^(  quiet_period_s:).*$", r"\g<1> 1", text, count=1))
    study_uid, _ = store_study(site, tmp_path, 4)
    age_study(site, study_uid)
    cfg = config.load(site.data_dir)
    conn = db.connect(cfg.db_path)
    building.build_due(conn, cfg)
    row = conn.execute("SELECT * FROM bundles WHERE kind='study'").fetchone()
    key = outbox.object_key(cfg, row)
    # A partial copy left by a pulled disk is resumed, not restarted or duplicated.
    local = cfg.data_dir / "bundles" / row["path"]
    partial = usb / (key + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(local.read_bytes()[:1000])
    conn.close()
    r = site.cli("sync", "now")
    assert r.returncode == 0, r.stdout + r.stderr
    final = usb / key
    assert final.is_file() and not partial.exists()
    conn = db.connect(cfg.db_path)
    assert status.reconcile(conn)["unconfirmed"] == 0
    conn.close()
    target = st.FolderTarget(usb)
    job = st.UploadJob(key=key, path=final, size=final.stat().st_size, sha256="0" * 64,
                       upload_id=None, part_size=1 << 20)
    with pytest.raises(st.TargetError, match="never overwritten"):
        target.upload(job)
    # Disk not mounted: the link is down, with the reason.
    final.rename(tmp_path / "moved")
    (usb).rename(tmp_path / "usb-unplugged")
    store_study(site, tmp_path, 1)
    r = site.cli("sync", "now")
    assert r.returncode == 3 and "not there" in r.stdout


def test_link_down_then_up_resumes_without_duplicates(site, tmp_path):
    port = free_port()  # nothing listens here yet: connection refused
    pub = age_identity(tmp_path / "cloud.key")
    configure_sync(site, f"http://127.0.0.1:{port}", [pub])
    study_uid, _ = store_study(site, tmp_path, 5)
    age_study(site, study_uid)
    r = site.cli("sync", "now")
    assert r.returncode == 3 and "link down" in r.stdout
    s = site.cli("sync", "status")
    assert "link: DOWN" in s.stdout and "testing" not in s.stdout
    f, _ = _figures(site)
    assert f["queued"] >= 1 and f["bytes_left"] > 0 and f["oldest_unsent_lag_s"] > 0
    # The link comes up on that address: sync resumes, nothing duplicated or lost.
    s3 = _moto_on(tmp_path, port)
    try:
        r = site.cli("sync", "now")
        assert r.returncode == 0, r.stdout + r.stderr
        _, rec = _figures(site)
        assert rec == {"unconfirmed": 0, "duplicated": 0, "instances": 5}
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]]
        assert len([k for k in keys if "-study-" in k]) == 1
    finally:
        s3.proc.terminate()
        s3.proc.wait()


def _moto_on(tmp_path, port):
    import test_sync_common as common

    real = common.free_port
    common.free_port = lambda: port
    try:
        return start_moto(tmp_path)
    finally:
        common.free_port = real


def test_an_object_in_the_way_holds_back_only_its_own_bundle(site, moto, tmp_path):
    pub = age_identity(tmp_path / "cloud.key")
    cfg = _sync_cfg(site, moto.url, pub)
    first, _ = store_study(site, tmp_path, 2)
    second, _ = store_study(site, tmp_path, 2)
    age_study(site, first)
    age_study(site, second)
    conn = db.connect(cfg.db_path)
    building.build_due(conn, cfg)
    row = conn.execute("SELECT * FROM bundles WHERE subject=?", (first,)).fetchone()
    conn.close()
    # Someone (or something) wrote other bytes under this bundle's name: never overwritten.
    moto.client().put_object(Bucket=BUCKET, Key=outbox.object_key(cfg, row), Body=b"other",
                             Metadata={"sha256": "0" * 64})
    r = site.cli("sync", "now")
    assert r.returncode == 3 and "could not be sent as they are" in r.stdout
    conn = db.connect(cfg.db_path)
    states = {r["subject"]: r["state"] for r in conn.execute("SELECT subject, state FROM bundles"
                                                             " WHERE kind='study'")}
    f = status.figures(conn)
    conn.close()
    assert states == {first: "uploading", second: "confirmed"}
    assert f["link_up"] is True and "never overwritten" in f["last_error"]
    body = moto.client().get_object(Bucket=BUCKET, Key=outbox.object_key(cfg, row))["Body"].read()
    assert body == b"other"


def test_the_read_queue_and_workflow_sync_action_set_the_priority(site, tmp_path):
    pub = age_identity(tmp_path / "cloud.key")
    cfg = _sync_cfg(site, "http://127.0.0.1:9", pub)
    stat, _ = store_study(site, tmp_path, 1, study_description="CT HEAD")
    high, _ = store_study(site, tmp_path, 1, study_description="CR CHEST")
    low, _ = store_study(site, tmp_path, 1, study_description="CT HEAD STAT")
    plain, _ = store_study(site, tmp_path, 1, study_description="CR HAND")
    conn = db.connect(cfg.db_path)
    conn.execute("UPDATE studies SET last_received = last_received - 3600")
    now = time.time()
    for uid, prio, actions in ((stat, "stat", "[]"), (high, "routine", '[{"sync": "high"}]'),
                               (low, "urgent", '[{"sync": "low"}]')):
        conn.execute(
            "INSERT INTO read_items (study_uid, priority, priority_rank, sla_minutes,"
            " first_received, due_at, created_at, updated_at, pool, pool_roles, actions)"
            " VALUES (?,?,0,60,?,?,?,?,'general','radiologist',?)",
            (uid, prio, now, now + 3600, now, now, actions))
    building.build_due(conn, cfg)
    got = {r["subject"]: r["priority"] for r in conn.execute(
        "SELECT subject, priority FROM bundles WHERE kind='study'")}
    conn.close()
    assert got == {stat: 0, high: 0, low: 2, plain: 2}


def test_a_lost_local_bundle_file_is_rebuilt_and_sent(site, moto, tmp_path):
    pub = age_identity(tmp_path / "cloud.key")
    cfg = _sync_cfg(site, moto.url, pub)
    uid, _ = store_study(site, tmp_path, 3)
    age_study(site, uid)
    conn = db.connect(cfg.db_path)
    building.build_due(conn, cfg)
    row = conn.execute("SELECT * FROM bundles WHERE kind='study'").fetchone()
    (cfg.data_dir / "bundles" / row["path"]).unlink()
    (cfg.data_dir / "bundles" / f".{row['path']}.999.part").write_bytes(b"left by a crash")
    conn.close()
    r = site.cli("sync", "now")  # notices the loss, builds it again under the same id, sends
    assert r.returncode == 0, r.stdout + r.stderr
    conn = db.connect(cfg.db_path)
    assert status.reconcile(conn) == {"unconfirmed": 0, "duplicated": 0, "instances": 3}
    conn.close()
    assert not list((cfg.data_dir / "bundles").iterdir())
