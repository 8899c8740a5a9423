"""The permission attacks against the real thing: ``appliance web`` under gunicorn, over TLS,
with bearer tokens, a study stored through the real study store and routed by the shipped
workflow. (tests/test_permissions.py runs the whole route matrix through Flask's client.)"""

from __future__ import annotations

import time

import requests
from conftest import Site
from reporting_site import ingest_study

from appliance.accounts import tokens
from appliance.accounts import users as accounts
from appliance.core import config
from appliance.reading import read_queue

PASSWORD = "correct-horse-battery"


def _prepare(site: Site) -> tuple[str, list[int]]:
    """Two studies of Other Hospital in the radiologists' pool; readers in and out of it."""
    uids = [ingest_study(site, 2, institution="Other Hospital", patient_name="VICTIM^PAT",
                         patient_id="PID-V-1") for _ in range(2)]
    conn = site.db()
    try:
        read_queue._SETS.clear()
        # the studies are complete once quiet for the settle time (30 s): run as if later
        read_queue.run_once(conn, config.load(site.data_dir).workflows_dir, time.time() + 60,
                            30.0)
        conn.execute("UPDATE read_items SET pool = 'radiologists', pool_roles = 'radiologist',"
                     " pool_tags = ''")
        items = [conn.execute("SELECT id FROM read_items WHERE study_uid = ?", (u,)).fetchone()[0]
                 for u in uids]
        for name, role, tags in (("dr.in", "radiologist", ""), ("dr.neuro", "neurologist", ""),
                                 ("dr.north", "radiologist", "site:North Hospital")):
            accounts.add_user(conn, name, role, PASSWORD, tags=tags)
    finally:
        conn.close()
    return uids[0], items


def _session(site: Site, user: str) -> requests.Session:
    conn = site.db()
    token = tokens.create_token(conn, user)
    conn.close()
    s = requests.Session()
    s.trust_env = False
    s.verify = str(site.data_dir / "tls" / "ca.crt")
    s.headers.update({"Authorization": f"Bearer {token}", "Accept": "application/json"})
    return s


def test_reader_outside_pool_cannot_addend_report_or_finish_a_read_without_one(site: Site):
    study, (item, second) = _prepare(site)
    site.start("web", wait_port=site.web_port)
    base = f"https://localhost:{site.web_port}"
    reader = _session(site, "dr.in")
    assert reader.post(f"{base}/api/v1/worklist/items/{item}/claim").status_code == 200
    r = reader.get(f"{base}/reports/item/{item}", allow_redirects=False)
    rid = int(r.headers["Location"].rsplit("/", 1)[1])
    assert reader.post(f"{base}/reports/{rid}/autosave", json={
        "revision": 0, "template_id": "generic", "findings": "Large left MCA infarct.",
        "impression": "Stroke."}).status_code == 200
    assert reader.post(f"{base}/reports/{rid}/sign", json={"level": "final"}).status_code == 200

    for outsider in ("dr.neuro", "dr.north"):  # outside the pool; in it but of another site
        s = _session(site, outsider)
        r = s.post(f"{base}/reports/{rid}/addendum", json={"text": "Addendum: disregard."})
        assert r.status_code == 403 and "VICTIM" not in r.text and "break-glass" in r.text
        for path in (f"/reports/{rid}", f"/reports/{rid}/print", f"/reports/{rid}.pdf",
                     f"/api/v1/worklist/items/{item}", f"/dicom-web/studies/{study}/metadata"):
            r = s.get(base + path)
            assert r.status_code == 403 and "VICTIM" not in r.text, (outsider, path)
        r = s.post(f"{base}/consults", json={"study_uid": study})
        assert r.status_code == 403 and "VICTIM" not in r.text

    # The claim holder of the second study tries to close it with no report.
    assert reader.post(f"{base}/api/v1/worklist/items/{second}/claim").status_code == 200
    for state in ("final", "delivered"):
        r = reader.post(f"{base}/api/v1/worklist/items/{second}/state", json={"state": state})
        assert r.status_code == 409 and "signing the report" in r.json()["error"]

    conn = site.db()
    try:
        assert conn.execute("SELECT count(*) FROM reports").fetchone()[0] == 1  # no addendum
        assert conn.execute("SELECT count(*) FROM consults").fetchone()[0] == 0
        assert tuple(conn.execute("SELECT state, read_at FROM read_items WHERE id = ?",
                            (second,)).fetchone()) == ("claimed", None)
        denied = {(r[0], r[1]) for r in conn.execute(
            "SELECT actor, action FROM audit WHERE outcome = 'denied'")}
    finally:
        conn.close()
    assert {("dr.neuro", "report.addendum"), ("dr.north", "report.addendum"),
            ("dr.north", "dicomweb.denied"), ("dr.neuro", "consult.create")} <= denied
