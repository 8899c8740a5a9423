"""A 200 MB bundle to a real S3 API (moto_server) in 8 MiB parts, the uploader kill -9'ed
at random points: it completes, no acknowledged part is sent again, one object, same SHA-256."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time

from conftest import appliance_cmd
from test_sync_common import BUCKET, age_identity, age_study, configure_sync, moto, store_study

__all__ = ["moto"]


def _bundle_row(site):
    conn = site.db()
    try:
        return conn.execute("SELECT * FROM bundles WHERE kind='study'").fetchone()
    finally:
        conn.close()


def _start_sync(site) -> subprocess.Popen:
    return subprocess.Popen(appliance_cmd("sync", "now", "--data-dir", str(site.data_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_200mb_upload_survives_kill_9_at_random_points(site, moto, tmp_path):
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    pub = age_identity(tmp_path / "cloud.key")
    # A 400 Mbit/s cap makes each part take ~0.2 s, so kills land inside parts too.
    configure_sync(site, moto.url, [pub], part_size_mb=8, parallel_parts=1,
                   bandwidth_kbit_s=400_000)
    study_uid, _ = store_study(site, tmp_path, 400, rows=512, cols=512)  # ~210 MB
    age_study(site, study_uid)

    kills = 0
    while kills < 3:
        base = _acked_bytes(site)
        proc = _start_sync(site)
        # Let it acknowledge a random number of further parts, then kill -9 it somewhere
        # inside the next part (or between parts).
        goal = base + rng.randint(1, 6) * (8 << 20)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and _acked_bytes(site) < goal:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))
        assert proc.poll() is None, f"sync ended before kill {kills + 1}: {proc.stdout.read()}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1

    proc = _start_sync(site)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out

    row = _bundle_row(site)
    assert row["state"] == "confirmed", dict(row)
    s3 = moto.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]
            if "-study-" in o["Key"]]
    assert len(keys) == 1, keys
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")
    h = hashlib.sha256()
    for chunk in s3.get_object(Bucket=BUCKET, Key=keys[0])["Body"].iter_chunks(1 << 20):
        h.update(chunk)
    assert h.hexdigest() == row["sha256"]  # hashed end to end (moto does not check parts)
    parts = -(-row["size"] // (8 << 20))
    assert row["size"] > 200_000_000 and parts >= 25
    puts = moto.part_puts()
    assert sorted(puts) == list(range(1, parts + 1))
    twice = {n: c for n, c in puts.items() if c > 1}
    assert not twice, f"acknowledged parts sent again: {twice}"
    print(f"\n{row['size'] / 1e6:.0f} MB in {parts} parts, {kills} kills, attempts "
          f"{row['attempts']}, bytes sent {row['bytes_sent'] / 1e6:.0f} MB")


def _acked_bytes(site) -> int:
    conn = site.db()
    try:
        return conn.execute("SELECT COALESCE(SUM(size), 0) FROM bundle_parts").fetchone()[0]
    finally:
        conn.close()
