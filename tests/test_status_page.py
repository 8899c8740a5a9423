"""The status page (coarse for anyone, details signed in), its alerts and SLOs, and /metrics."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import time

import pytest
from conftest import require_module, require_tool
from dicom_data import write_series
from test_health import fetch, start_all, wait_ready

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _token(site, role: str = "responder") -> str:
    from appliance.accounts import tokens
    from appliance.accounts import users as accounts

    conn = site.db()
    accounts.add_user(conn, "watcher", role, "watcher-password-1")
    token = tokens.create_token(conn, "watcher", label="status test")
    conn.close()
    return token


def _store(site, dcmtk, tmp_path, n: int = 2, calling: str = "SCANNER1", modality: str = "CT"):
    _study, _series, paths = write_series(tmp_path / f"s-{calling}", n, modality=modality)
    r = subprocess.run([dcmtk["storescu"], "-aet", calling, "-aec", site.ae_title, "127.0.0.1",
                        str(site.dicom_port), *map(str, paths)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "TCP_NODELAY": "1"})
    assert r.returncode == 0, r.stderr


def test_status_page_in_chromium_during_a_fault(site, dcmtk, artifacts, tmp_path):
    chromium = require_tool("chromium", "/usr/bin/chromium")
    sync_api = require_module("playwright.sync_api")
    start_all(site)
    _store(site, dcmtk, tmp_path)
    token = _token(site)
    site.stop("dicom", signal.SIGKILL)  # the fault shown on the page
    wait_ready(site, 503, "DICOM port")
    base = f"https://127.0.0.1:{site.web_port}"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            anon = browser.new_context(ignore_https_errors=True).new_page()
            anon.goto(base + "/status")
            assert anon.get_attribute("header", "data-status") == "red"
            assert anon.locator("#alerts").count() == 0  # no details without signing in
            assert anon.locator("a[href^='/login']").count() == 1
            ctx = browser.new_context(ignore_https_errors=True,
                                      viewport={"width": 1280, "height": 900},
                                      extra_http_headers={"Authorization": f"Bearer {token}"})
            page = ctx.new_page()
            page.goto(base + "/status")
            assert page.get_attribute("header", "data-status") == "red"
            alerts = page.inner_text("#alerts")
            assert f"DICOM port {site.dicom_port} is not listening" in alerts
            assert "DOWN" in page.inner_text("#components")
            slo_text = page.inner_text("#slos")
            for name in ("Uptime", "Video join", "Call drops", "Authentication",
                         "Reads within SLA"):
                assert name in slo_text
            assert page.locator("#plots svg").count() == 6
            shot = artifacts / "status-page-dicom-down.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
    # /metrics still answers during the fault, with the DICOM process's C-STORE figures.
    status, body = fetch(site, "/metrics")
    text = body.decode()
    assert status == 200
    assert 'appliance_cstore_total{calling_ae="SCANNER1",outcome="ok"} 2.0' in text
    assert 'appliance_cstore_seconds_count{calling_ae="SCANNER1"} 2.0' in text
    assert "appliance_ready 0.0" in text
    assert 'appliance_component_up{component="worker"} 1.0' in text
    assert "appliance_studies 1.0" in text and "appliance_disk_free_bytes" in text
    assert "appliance_worker_last_sweep_timestamp_seconds " in text  # from the worker process


def test_anonymous_json_is_coarse_and_signed_in_json_is_detailed(site, dcmtk):
    start_all(site)
    token = _token(site)
    status, body = fetch(site, "/status.json")
    import json

    coarse = json.loads(body)
    assert status == 200 and coarse["status"] in ("green", "amber") and not coarse["detailed"]
    assert set(coarse) == {"site", "status", "checked_at", "detailed"}
    status, body = fetch(site, "/status.json", {"Authorization": f"Bearer {token}"})
    full = json.loads(body)
    assert full["detailed"] and full["ready"] and len(full["slos"]) == 5
    assert full["components"]["worker"]["up"]
    # The worker wrote this minute's health sample.
    assert full["series"]["ready"] and full["series"]["ready"][-1][1] == 1.0


# -- the report itself, on a crafted database (no processes needed) -------------------------------
@pytest.fixture
def report_env(site):
    from appliance.core import config, db

    conn = db.open_db(site.data_dir / "appliance.db")
    yield config.load(site.data_dir), conn
    conn.close()


def _titles(report) -> list[str]:
    return [a["title"] for a in report["alerts"]]


def test_slo_values_and_error_budgets(report_env):
    from appliance.health import series as health_series
    from appliance.health import status_report

    cfg, conn = report_env
    now = time.time()
    start, _end = status_report.month_bounds(now)
    first = max(start, now - 99 * 60)
    minutes = int((now - first) // 60)
    for i in range(minutes + 1):
        health_series.record(conn, {"ready": 0.0 if i == 5 else 1.0}, now=first + i * 60)
    for i in range(100):
        health_series.observe(conn, "auth", 0.2 if i >= 2 else 4.0, good=i >= 2, ts=now - 10)
    report = status_report.collect(cfg, conn, now=now)
    slos = {s["key"]: s for s in report["slos"]}
    up = slos["uptime"]
    assert up["bad"] == 1 and up["total"] == minutes + 1
    assert up["budget_left"] == pytest.approx(1 - 1 / up["allowed_bad"])
    auth = slos["auth"]
    assert auth["current"] == pytest.approx(0.98) and not auth["met"]
    assert auth["budget_left"] == pytest.approx(-1.0)  # 2 bad against a budget of 1
    assert slos["video_join"]["current"] is None and slos["video_join"]["budget_left"] == 1.0


def test_restart_loop_alert(report_env):
    from appliance.health import series as health_series
    from appliance.health import status_report

    cfg, conn = report_env
    now = time.time()
    for i in range(3):
        conn.execute("INSERT OR REPLACE INTO components (name, pid, started_at, heartbeat_at,"
                     " detail) VALUES ('worker', ?, ?, ?, '{}')", (1000 + i, now - 300 + i * 60,
                                                                  now - 300 + i * 60))
        health_series.note_component_starts(conn)
    assert "worker is restarting in a loop" in _titles(status_report.collect(cfg, conn, now=now))


def test_sla_breach_and_unexpected_modality_alerts(report_env, tmp_path):
    from appliance.health import status_report

    cfg, conn = report_env
    now = time.time()
    conn.execute(
        "INSERT INTO read_items (study_uid, priority, priority_rank, sla_minutes, first_received,"
        " due_at, created_at, updated_at, pool, pool_roles) VALUES"
        " ('1.2.3', 'stat', 0, 30, ?, ?, ?, ?, 'default', 'radiologist')",
        (now - 3600, now - 1800, now - 3600, now - 3600))
    text = (cfg.data_dir / "appliance.yaml").read_text()
    (cfg.data_dir / "appliance.yaml").write_text(
        text.replace("allowed_modalities: []", "allowed_modalities: [CT]"))
    from appliance.core import config

    cfg = config.load(cfg.data_dir)
    conn.execute("INSERT INTO studies (study_uid, modalities, first_received, last_received)"
                 " VALUES ('9.9', 'MR', ?, ?)", (now, now))
    conn.execute("INSERT INTO series (series_uid, study_uid, modality) VALUES ('9.9.1', '9.9',"
                 " 'MR')")
    titles = _titles(status_report.collect(cfg, conn, now=now))
    assert "1 stat read(s) past their SLA" in titles
    assert "1 study(ies) of unexpected modality MR today" in titles
    reads = {s["key"]: s for s in status_report.collect(cfg, conn, now=now)["slos"]}
    assert reads["read_within_sla"]["bad"] == 1


def test_certificate_expiry_alerts(report_env):
    from cryptography import x509

    from appliance.health import status_report

    cfg, conn = report_env
    cert = x509.load_pem_x509_certificate((cfg.tls_dir / "server.crt").read_bytes())
    end = cert.not_valid_after_utc.timestamp()
    soon = _titles(status_report.collect(cfg, conn, now=end - 5 * 86400 + 60))
    assert "TLS certificate expires in 5 days" in soon
    assert "TLS certificate expired" in _titles(status_report.collect(cfg, conn, now=end + 86400))
    assert not [t for t in _titles(status_report.collect(cfg, conn)) if "certificate" in t]


def test_disk_filling_alert(report_env):
    from appliance.health import series as health_series
    from appliance.health import status_report

    cfg, conn = report_env
    text = (cfg.data_dir / "appliance.yaml").read_text()
    (cfg.data_dir / "appliance.yaml").write_text(text.replace("low_water_mb: 0",
                                                              "low_water_mb: 500"))
    from appliance.core import config

    cfg = config.load(cfg.data_dir)
    now = time.time()
    for i in range(12):  # 1000 MiB free falling 100 MiB an hour over the last two hours
        health_series.record(conn, {"free_disk_mb": 1000 - i * 100 / 6},
                             now=now - 2 * 3600 + i * 600)
    titles = _titles(status_report.collect(cfg, conn, now=now))
    assert any(t.startswith("disk filling: reserve reached in about") for t in titles), titles


def test_month_bounds():
    from appliance.health import status_report

    t = dt.datetime(2024, 2, 15, 12, tzinfo=dt.UTC).timestamp()
    start, end = status_report.month_bounds(t)
    assert (end - start) / 86400 == 29


def test_request_id_on_every_log_line_and_response(site, caplog):
    import logging

    from flask import current_app

    from appliance.app import create_app
    from appliance.core import config

    caplog.set_level(logging.INFO)
    app = create_app(config.load(site.data_dir))

    def noisy():
        current_app.logger.info("handling")
        return "ok"

    app.add_url_rule("/test-noisy", view_func=noisy)
    client = app.test_client()
    given = client.get("/test-noisy", headers={"X-Request-Id": "abc12345-given"})
    assert given.headers["X-Request-Id"] == "abc12345-given"
    fresh = client.get("/test-noisy", headers={"X-Request-Id": "bad id <script>"})
    minted = fresh.headers["X-Request-Id"]
    assert minted != "bad id <script>" and len(minted) == 16
    ids = [getattr(r, "request_id", None) for r in caplog.records if r.getMessage() == "handling"]
    assert ids == ["abc12345-given", minted]


def test_sign_ins_are_timed_for_the_slo_and_metrics(site):
    """The web app times its own sign-ins: an SLO observation and Prometheus figures."""
    import re

    from appliance.accounts import users as accounts
    from appliance.app import create_app
    from appliance.core import config
    from appliance.health import series as health_series

    conn = site.db()
    accounts.add_user(conn, "timed", "responder", "timed-password-1")
    conn.close()
    app = create_app(config.load(site.data_dir))
    client = app.test_client()

    def sign_in(password: str):
        form = client.get("/login", base_url="https://localhost").get_data(as_text=True)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
        return client.post("/login", base_url="https://localhost", data={
            "username": "timed", "password": password, "csrf_token": csrf})

    assert sign_in("wrong-password").status_code == 401
    assert sign_in("timed-password-1").status_code in (302, 303)
    conn = site.db()
    total, bad = health_series.observations(conn, "auth", time.time() - 60)
    conn.close()
    assert (total, bad) == (2, 0)  # both answered well under 3 s
    client.get("/dicom-web/studies", base_url="https://localhost")  # a QIDO search, timed too
    text = client.get("/metrics", base_url="https://localhost").get_data(as_text=True)
    assert "appliance_auth_seconds_count 2.0" in text
    assert "appliance_auth_failures_total 1.0" in text
    assert 'appliance_dicomweb_seconds_count{service="qido"} 1.0' in text


def test_uptime_counts_missing_minutes_as_down_but_not_the_current_one(report_env):
    from appliance.health import series as health_series

    _cfg, conn = report_env
    base = 1_800_000_000.0  # a minute boundary
    for i in (0, 1, 2, 5):  # minutes 3 and 4 have no sample: the box was off
        health_series.record(conn, {"ready": 1.0}, now=base + i * 60)
    assert health_series.uptime(conn, base, now=base + 5 * 60 + 10) == (6, 2)
    # Minute 6 has begun but is not sampled yet: not counted against uptime.
    assert health_series.uptime(conn, base, now=base + 6 * 60 + 10) == (6, 2)
    assert health_series.uptime(conn, base, now=base + 7 * 60 + 10) == (7, 3)
