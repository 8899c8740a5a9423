"""The hand-back's progress panel on /status (and its /metrics gauges), read through the Flask
test client by a signed-in site user while a real hand-back goes to Orthanc behind a thin
link: the panel shows the figures the terminal bar was given, a hand-back killed with -9
shows as interrupted (not running forever), and the resumed run ends done with the totals
Orthanc holds.  Counts only: no patient data on the page."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import time
from html.parser import HTMLParser

import pytest
from conftest import appliance_cmd
from forwarding_site import (
    FAR,
    ThrottledLink,
    forwarding_site,
    ingest,
    pacs_sop_uids,
    sign_report,
)
from test_auth import HTML, PASSWORD, post_login

from appliance.accounts import users as accounts
from appliance.app import create_app
from appliance.core import db
from appliance.forwarding import cli as forwarding_cli
from appliance.forwarding import handback, outbox, progress, sending
from dicom_node import index as dicom_index


@pytest.fixture
def link(pacs):
    thin = ThrottledLink(pacs.dicom_port, bytes_per_s=1_000_000)  # 8 Mbit/s
    yield thin
    thin.close()


class _Panel(HTMLParser):
    """The hand-back rows of the status page: destination → {row_state, figure: text}."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.row: dict[str, str] | None = None
        self.figure: str | None = None
        self.inside = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.inside = a.get("id") == "handback"
        elif self.inside and tag == "tr" and "data-destination" in a:
            self.row = self.rows.setdefault(a["data-destination"], {"row_state": a["data-state"]})
        elif self.row is not None and tag == "td" and "data-figure" in a:
            self.figure = a["data-figure"]
            self.row[self.figure] = ""

    def handle_endtag(self, tag):
        if tag == "td":
            self.figure = None
        elif tag == "section":
            self.inside, self.row = False, None

    def handle_data(self, data):
        if self.row is not None and self.figure:
            self.row[self.figure] = " ".join((self.row[self.figure] + " " + data).split())


def _panel(client) -> dict[str, dict[str, str]]:
    page = client.get("/status", headers=HTML)
    assert page.status_code in (200, 503)
    parser = _Panel()
    parser.feed(page.get_data(as_text=True))
    return parser.rows


def _signed_in(cfg, conn):
    accounts.add_user(conn, "clerk", "site_staff", PASSWORD)
    client = create_app(cfg, {"TESTING": True}).test_client()
    client.environ_base.update({"wsgi.url_scheme": "https", "REMOTE_ADDR": "127.0.0.1"})
    assert post_login(client, "clerk", PASSWORD).status_code == 302
    return client


def _metrics(client) -> dict[tuple[str, ...], float]:
    text = client.get("/metrics").get_data(as_text=True)
    out = {}
    for name, labels, value in re.findall(r'^(appliance_handback_\w+)\{([^}]*)\} (\S+)$', text,
                                          re.M):
        out[(name, *sorted(re.findall(r'="([^"]*)"', labels)))] = float(value)
    return out


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _shown(snap: progress.Snapshot) -> dict[str, str]:
    """What the panel must show for this snapshot (the bar's figures)."""
    return {"state": snap.state,
            "instances": f"{snap.instances_sent} of {snap.instances_planned}",
            "mb": f"{_mb(snap.bytes_sent)} of {_mb(snap.bytes_planned)}",
            "time_left": progress.duration_text(snap.seconds_left),
            "reports": f"{snap.reports_sent} of {snap.reports_planned}"}


def test_the_panel_shows_the_bars_figures_while_it_runs_and_the_manifest_when_done(
        tmp_path, pacs, link):
    site, cfg = forwarding_site(tmp_path, pacs, port=link.port, batch=5)
    for f in (site.data_dir / "workflows").glob("*.yaml"):
        f.unlink()
    studies = [ingest(site, 20, rows=128, cols=128, accession=f"ACC{i}")[0] for i in range(3)]
    conn = db.connect(cfg.db_path)
    with db.transaction(conn):
        outbox.enqueue_study(conn, studies[0], ["SITEPACS"], "routine", FAR)
    assert sending.run_due(cfg, now=FAR)["stored"] == 20  # already on the PACS
    sign_report(conn, cfg, studies[1])
    client = _signed_in(cfg, conn)
    assert _panel(client) == {}  # no hand-back yet: no panel
    assert 'id="handback"' not in client.get("/status", headers=HTML).get_data(as_text=True)

    seen: list[tuple[progress.Snapshot, dict, dict, str]] = []

    def bar(snap: progress.Snapshot) -> None:  # the terminal bar's callback
        if not seen and snap.state == "running" and 0 < snap.instances_sent < 40:
            seen.append((snap, _panel(client)["SITEPACS"], _metrics(client),
                         forwarding_cli.bar_line(snap)))

    result = handback.run(conn, cfg, "SITEPACS", progress=bar)
    assert result["sent"] == 40 and result["not_delivered"] == 0, result
    assert seen, "no snapshot caught the hand-back halfway"
    snap, during, gauges, line = seen[0]
    assert snap.instances_planned == 40 and snap.bytes_planned == sum(
        r["size"] for st in studies[1:] for r in dicom_index.instances_to_send(conn, st))
    assert {k: during[k] for k in _shown(snap)} == _shown(snap)
    assert during["rate"].startswith(f"{_mb(snap.rate_bytes_s)} MB/s") and snap.rate_bytes_s > 0
    assert snap.seconds_left is not None and during["time_left"] != "—"
    assert f"{snap.instances_sent}/40 instances" in line  # the bar prints the same figures
    assert f"{_mb(snap.bytes_sent)}/{_mb(snap.bytes_planned)} MB" in line
    assert gauges[("appliance_handback_instances", "SITEPACS", "sent")] == snap.instances_sent
    assert gauges[("appliance_handback_state", "SITEPACS", "running")] == 1.0

    done = _panel(client)["SITEPACS"]
    assert done["state"] == "done" and done["instances"] == "40 of 40"
    assert done["mb"] == f"{_mb(snap.bytes_planned)} of {_mb(snap.bytes_planned)}"
    assert done["reports"] == "1 of 1" and done["manifest"] == result["manifest"]
    assert done["rate"] == "—" and done["time_left"] == "—"
    assert len(pacs_sop_uids(pacs)) == 20 + 40 + 1
    page = client.get("/status", headers=HTML).get_data(as_text=True)
    assert "DOE^JANE" not in page and "PAT001" not in page and studies[1] not in page
    anonymous = create_app(cfg, {"TESTING": True}).test_client()
    anonymous.environ_base.update({"wsgi.url_scheme": "https"})
    assert 'id="handback"' not in anonymous.get("/status", headers=HTML).get_data(as_text=True)
    gauges = _metrics(client)
    assert gauges[("appliance_handback_instances", "SITEPACS", "planned")] == 40
    assert gauges[("appliance_handback_report_documents", "SITEPACS", "sent")] == 1
    assert gauges[("appliance_handback_state", "SITEPACS", "done")] == 1.0
    assert gauges[("appliance_handback_state", "SITEPACS", "running")] == 0.0


def _wait(predicate, what: str, proc: subprocess.Popen, timeout: float = 60.0):
    """Poll another process's effect (no event crosses processes) until ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        assert proc.poll() is None, f"the hand-back exited early: {proc.stderr.read()}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_shows_interrupted_and_the_resumed_run_ends_done_with_orthancs_totals(
        tmp_path, pacs, link):
    site, cfg = forwarding_site(tmp_path, pacs, port=link.port, batch=10)
    for f in (site.data_dir / "workflows").glob("*.yaml"):
        f.unlink()
    for i in range(4):
        ingest(site, 40, rows=128, cols=128, accession=f"ACC{i}")
    conn = db.connect(cfg.db_path)
    client = _signed_in(cfg, conn)
    total = sum(r["size"] for r in dicom_index.instances_to_send(conn, received_since=0))
    cmd = appliance_cmd("handback", "--to", "SITEPACS", "--json", "--data-dir", str(site.data_dir))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        def halfway():
            row = _panel(client).get("SITEPACS")
            n = int(row["instances"].split()[0]) if row else 0
            return row if row and row["row_state"] == "running" and 40 <= n < 160 else None

        during = _wait(halfway, "the panel to show the hand-back halfway", proc)
        assert during["instances"].endswith(" of 160") and during["rate"].endswith("instances/s)")
        with pytest.raises(handback.HandbackError, match="already running"):
            handback.run(conn, cfg, "SITEPACS")  # a second hand-back to the same PACS
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stopped = _panel(client)["SITEPACS"]
    sent_before = int(stopped["instances"].split()[0])
    assert stopped["row_state"] == "interrupted" and 40 <= sent_before < 160, stopped
    assert "appliance handback --to SITEPACS" in stopped["state"]  # how to resume
    assert stopped["instances"] == f"{sent_before} of 160" and stopped["rate"] == "—"
    assert _metrics(client)[("appliance_handback_state", "SITEPACS", "interrupted")] == 1.0

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads(rerun.stdout)
    done = _panel(client)["SITEPACS"]
    held = collections.Counter(pacs_sop_uids(pacs))
    assert len(held) == 160 and set(held.values()) == {1}
    assert done["state"] == "done" and done["instances"] == f"{len(held)} of 160"
    assert done["mb"] == f"{_mb(total)} of {_mb(total)}"
    assert done["manifest"] == result["manifest"] and "resumed 1×" in done["started"]
    assert result["sent"] < 160  # the resumed run sent only what the PACS still lacked
    gauges = _metrics(client)
    assert gauges[("appliance_handback_instances", "SITEPACS", "sent")] == 160
    assert gauges[("appliance_handback_bytes", "SITEPACS", "sent")] == total


def test_a_running_row_is_interrupted_only_when_its_writer_is_gone(tmp_path):
    """This host: by the writer's pid, however long its last pass took; another host: once
    the row has not moved for STALE_S (a fixed clock, no waiting)."""
    import socket

    from reporting_site import local_site

    site = local_site(tmp_path)
    conn = db.connect(site.data_dir / "appliance.db")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid of this host that is gone
    t = 1_800_000_000.0
    for dest, host, pid in (("LIVE", socket.gethostname(), os.getpid()),
                            ("DEAD", socket.gethostname(), dead.pid),
                            ("AWAY", "another-box", 1)):
        conn.execute("INSERT INTO handback_progress (destination, started_at, updated_at,"
                     " instances_planned, owner_host, owner_pid) VALUES (?,?,?,10,?,?)",
                     (dest, t, t, host, pid))
    conn.commit()

    def states(now):
        return {s.destination: s.state for s in progress.recent(conn, now)}

    assert states(t + 1) == {"LIVE": "running", "DEAD": "interrupted", "AWAY": "running"}
    later = t + progress.STALE_S + 1
    assert states(later) == {"LIVE": "running", "DEAD": "interrupted", "AWAY": "interrupted"}
    with pytest.raises(progress.AlreadyRunning, match="pid"):
        progress.check_not_running(conn, "LIVE", later)
    assert progress.check_not_running(conn, "AWAY", later).state == "interrupted"
    assert states(t + progress.RECENT_S + 10) == {"LIVE": "running"}  # old ones drop off
