"""A STAT study on the worklist while it arrives, with the real parts: dcmtk's storescu pushes
the first image of a head CT to ``appliance dicom``, the real ``appliance worker`` (default
sweep interval, 30 s quiet period) lists it as arriving long before the quiet period ends, its
image count rises with the next images, and completion (the sweep with its clock moved past
the quiet period) keeps the one read item."""

from __future__ import annotations

import time

from conftest import Site
from dicom_data import write_series
from test_read_queue_worker import push, scalar, wait_until

from appliance.core import config
from appliance.reading import read_queue


def test_arriving_stat_study_listed_before_quiet_period_and_keeps_one_item(
        dicom_site: Site, dcmtk, tmp_path):
    site = dicom_site
    cfg = config.load(site.data_dir)
    quiet = float(cfg["worker"]["quiet_period_s"])
    study_uid, series_uid, _ = write_series(tmp_path / "first", 1, rows=16, cols=16,
                                            body_part="HEAD")
    write_series(tmp_path / "rest", 3, rows=16, cols=16, body_part="HEAD", study_uid=study_uid)
    site.start("worker")
    wait_until("the worker's first sweep", lambda: scalar(
        site, "SELECT COUNT(*) FROM workflow_files WHERE active_sha IS NOT NULL") > 0, 20)

    pushed = time.monotonic()
    push(dcmtk, site, tmp_path / "first")
    wait_until("a read item for the first image", lambda: scalar(
        site, "SELECT COUNT(*) FROM read_items WHERE study_uid = ?", study_uid) == 1, quiet - 5)
    listed_after = time.monotonic() - pushed
    assert listed_after < quiet - 5, listed_after  # listed while the study is still arriving
    assert scalar(site, "SELECT arriving FROM read_items") == 1
    assert scalar(site, "SELECT priority FROM read_items") == "stat"

    push(dcmtk, site, tmp_path / "rest")
    wait_until("the image count rising", lambda: scalar(
        site, "SELECT instances_seen FROM read_items") == 4, quiet - 5)
    assert scalar(site, "SELECT arriving FROM read_items") == 1
    first = scalar(site, "SELECT first_received FROM studies")
    assert scalar(site, "SELECT due_at FROM read_items") == first + 30 * 60  # from image one

    site.stop("worker")
    counts = read_queue.sweep(cfg, now=time.time() + quiet + 1)
    assert counts is not None and (counts["created"], counts["completed"]) == (0, 1)
    assert scalar(site, "SELECT COUNT(*) FROM read_items") == 1
    assert scalar(site, "SELECT arriving FROM read_items") == 0
    assert scalar(site, "SELECT late_instances FROM read_items") == 0
    assert scalar(site, "SELECT COUNT(*) FROM pending_completions") == 0
    print(f"first image -> read item: {listed_after:.2f} s")
