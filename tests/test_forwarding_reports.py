"""A signed report to a PACS with Storage Commitment is ``delivered`` only once committed."""

from __future__ import annotations

import time

from forwarding_site import add_destination, site_pacs
from reporting_site import add_users, ingest_study, local_site, set_reports_config

from appliance.core import db
from appliance.reports import delivery as report_delivery
from appliance.reports import model as reports
from appliance.runtime import dicom_service


def test_a_report_counts_as_delivered_only_when_the_pacs_committed_it(tmp_path):
    pacs = site_pacs(tmp_path / "orthanc")
    pacs.start()
    site = local_site(tmp_path)
    path = site.data_dir / "appliance.yaml"
    path.write_text(path.read_text().replace("  port: 11112", f"  port: {pacs.node_port}", 1))
    add_destination(site, "SITEPACS", pacs.dicom_port, commitment=True)
    cfg = set_reports_config(site, deliver_to="SITEPACS", formats="[sr]")
    add_users(site)
    conn = db.connect(cfg.db_path)
    study_uid = ingest_study(site, 1)
    templates = reports.load_templates()
    t0 = time.time()
    rid = reports.create(conn, study_uid=study_uid, author="dr.ray", template_id="generic",
                         templates=templates, now=t0)
    reports.autosave(conn, rid, actor="dr.ray", templates=templates, base_revision=0,
                     fields={}, findings="No acute finding.", impression="Normal.", now=t0)
    report_delivery.sign(conn, cfg, rid, actor="dr.ray", level="final", templates=templates,
                         now=t0)
    try:
        assert report_delivery.run_due(cfg, now=t0) == {"delivered": 0, "failed": 1}
        row = report_delivery.for_report(conn, rid)[0]
        assert row["state"] == "pending" and "awaiting storage commitment" in row["last_error"]
        assert len(pacs.instances()) == 1  # stored, but not yet proved

        node = dicom_service.build_node(cfg)  # the PACS reports to our node …
        node.start()
        try:
            deadline, t = time.monotonic() + 20, t0
            while report_delivery.run_due(cfg, now=t)["delivered"] == 0:
                assert time.monotonic() < deadline, "never committed"
                time.sleep(0.2)
                t += 3600  # the retry is due (fake clock)
        finally:
            node.stop()
        row = report_delivery.for_report(conn, rid)[0]
        assert row["state"] == "delivered"
        assert len(pacs.instances()) == 1  # one object, however many attempts
        proof = conn.execute("SELECT state, proof FROM forward_outbox WHERE sop_uid = ?",
                             (row["sop_uid"],)).fetchone()
        assert tuple(proof) == ("delivered", "commitment")
    finally:
        pacs.stop(kill=True)
