"""A failing destination shows on the status report (amber after ``failing_alert_min``, never
red: forwarding never blocks ingest) and in /metrics; the figures are the outbox's."""

from __future__ import annotations

import time

from forwarding_site import add_destination, ingest
from reporting_site import local_site

from appliance.core import config, db
from appliance.forwarding import outbox
from appliance.health import readiness, status_report


def test_a_destination_failing_15_min_turns_the_status_amber_and_shows_in_metrics(tmp_path):
    site = local_site(tmp_path)
    add_destination(site, "SITEPACS", 9)  # nothing listens on port 9
    cfg = config.load(site.data_dir)
    conn = db.connect(cfg.db_path)
    study_uid, _ = ingest(site, 3)
    now = time.time()
    with db.transaction(conn):
        outbox.enqueue_study(conn, study_uid, ["SITEPACS"], "stat", now - 3600)
    ids = [r[0] for r in conn.execute("SELECT id FROM forward_outbox")]
    outbox.retry_later(conn, ids, None, "SITEPACS at 127.0.0.1:9 did not answer", now - 14 * 60,
                       5, 300)
    report = status_report.collect(cfg, conn, now=now)
    assert [a for a in report["alerts"] if "forwarding" in a["title"]] == []
    assert report["forwarding"][0]["waiting"] == 3

    later = now + 60  # failing for 15 min now
    report = status_report.collect(cfg, conn, now=later)
    titles = [a["title"] for a in report["alerts"] if a["severity"] == "amber"]
    assert "forwarding to SITEPACS failing for 15 min" in titles
    assert not any("forwarding" in r for r in readiness.check(cfg, now=later)[1])  # ready still
    d = report["forwarding"][0]
    assert (d["destination"], d["waiting"], d["alert"]) == ("SITEPACS", 3, True)
    assert d["last_error"] == "SITEPACS at 127.0.0.1:9 did not answer"

    from prometheus_client.core import GaugeMetricFamily

    from appliance.health import status_page

    families = {f.name: f for f in status_page._forward_families(conn, later, GaugeMetricFamily)}
    samples = {(s.labels["destination"], s.labels["state"]): s.value
               for s in families["appliance_forward_instances"].samples}
    assert samples[("SITEPACS", "waiting")] == 3 and samples[("SITEPACS", "delivered")] == 0
    oldest = families["appliance_forward_oldest_waiting_seconds"].samples[0].value
    assert abs(oldest - (later - (now - 3600))) < 1
