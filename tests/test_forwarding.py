"""``forward: AE`` sends every instance of a matching study to a real Orthanc (the site PACS):
as stored, decompressed only where the PACS demands it, retried with backoff, proved by a
C-FIND or by Storage Commitment.  Clocks are passed in; no test sleeps through a backoff."""

from __future__ import annotations

import pydicom
import pytest
from forwarding_site import FAR, complete, forwarding_site, ingest, pacs_sop_uids, site_pacs

from appliance.core import audit, db
from appliance.forwarding import outbox, sending


@pytest.fixture
def pacs(tmp_path):
    p = site_pacs(tmp_path / "orthanc")
    p.start()
    yield p
    p.stop(kill=True)


def test_a_forward_rule_sends_the_study_as_stored_and_proves_it_by_c_find(tmp_path, pacs):
    site, cfg = forwarding_site(tmp_path, pacs)
    study_uid, paths = ingest(site, 5)
    assert pacs.instances() == []
    complete(cfg)
    conn = db.connect(cfg.db_path)
    assert outbox.study_summary(conn, study_uid)["SITEPACS"]["waiting"] == 5

    assert sending.run_due(cfg, now=FAR) == {"stored": 5, "refused": 0, "retry": 0}

    assert sorted(pacs_sop_uids(pacs)) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in paths)
    for i in pacs.instances():
        got = pydicom.dcmread(__import__("io").BytesIO(pacs.file(i)))
        mine = next(pydicom.dcmread(p) for p in paths
                    if pydicom.dcmread(p).SOPInstanceUID == got.SOPInstanceUID)
        assert got.PixelData == mine.PixelData  # byte-identical pixels
    rows = outbox.study_rows(conn, study_uid)
    assert {(r["state"], r["proof"]) for r in rows} == {("delivered", "c-find")}
    assert sending.run_due(cfg, now=FAR + 1) == {"stored": 0, "refused": 0, "retry": 0}
    assert len(pacs.instances()) == 5
    assert [r["action"] for r in audit.rows(conn) if r["action"].startswith("forward.")] == [
        "forward.sent"]
