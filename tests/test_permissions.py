"""The permission table: every rule of the app × every role → allowed or denied, by real requests.

A route that is neither wrapped in ``auth.require`` nor public on purpose
(``@auth.public`` or ``permissions.PUBLIC_ENDPOINTS``) fails this test, so a
route added without a permission cannot slip in. The measured table is saved
as a test artifact (``permissions.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import url_for
from test_auth import AuthApp, make_auth_app

from appliance.accounts import permissions
from appliance.accounts import sessions as auth
from appliance.accounts import users as accounts

DENIED_PREFIX = "forbidden: this needs the role"
SAFE_METHODS = {"GET"}

# The areas of this brief, stated independently of the decorators.
EXPECTED = {
    "ui.worklist_page": permissions.READERS,
    "ui.worklist_items": permissions.READERS,
    "ui.claim": permissions.READERS,
    "ui.release": permissions.READERS,
    "ui.dashboard": ("admin", "responder", "radiologist", "neurologist"),
    "admin.users": ("admin",),
    "admin.set_disabled": ("admin",),
    "admin.audit_trail": ("admin",),
    "admin.break_glass_list": ("admin",),
    "auth_views.break_glass": ("radiologist", "neurologist", "site_staff"),
    "auth_views.change_password": accounts.ROLES,
}


@pytest.fixture(scope="module")
def perm_app(tmp_path_factory) -> tuple[AuthApp, dict[str, str]]:
    a = make_auth_app(tmp_path_factory.mktemp("perm"))
    bearer = {}
    for role in accounts.ROLES:
        a.add_user(f"u-{role.replace('_', '-')}", role)
        bearer[role] = a.token(f"u-{role.replace('_', '-')}")
    return a, bearer


def _is_public(app, endpoint: str) -> bool:
    view = app.view_functions[endpoint]
    return getattr(view, "auth_public", False) or endpoint in permissions.PUBLIC_ENDPOINTS


CANDIDATES = ("1.2.3", 1, 1.0, "00000000-0000-0000-0000-000000000000", "a")


def _url(app, rule) -> str:
    """A URL this very rule matches, with dummy values its converters accept."""
    args = {}
    for name, conv in rule._converters.items():
        args[name] = next(v for v in CANDIDATES if _accepts(conv, v))
    with app.test_request_context():
        return url_for(rule.endpoint, **args)


def _accepts(conv, value) -> bool:
    try:
        return re.fullmatch(conv.regex, str(conv.to_url(value))) is not None
    except Exception:
        return False


def _routes(app):
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield rule, method


def test_every_route_declares_who_may_use_it(perm_app):
    app = perm_app[0].app
    missing = [f"{m} {r.rule} ({r.endpoint})" for r, m in _routes(app)
               if not _is_public(app, r.endpoint)
               and not hasattr(app.view_functions[r.endpoint], "auth_roles")]
    assert not missing, "routes without @auth.require or @auth.public:\n" + "\n".join(missing)


def test_no_credentials_is_401_everywhere_but_public_routes(perm_app):
    a, _ = perm_app
    c = a.client()
    wrong = []
    for rule, method in _routes(a.app):
        if _is_public(a.app, rule.endpoint):
            continue
        try:
            r = c.open(_url(a.app, rule), method=method, headers={"Accept": "application/json"})
            status = r.status_code
        except Exception as e:  # the view ran: that is a hole
            status = f"view ran ({type(e).__name__})"
        if status != 401:
            wrong.append(f"{method} {rule.rule}: {status}")
    assert not wrong, "answered without credentials:\n" + "\n".join(wrong)


def _outcome(c, url: str, method: str, token: str) -> str:
    try:
        r = c.open(url, method=method, headers={"Authorization": f"Bearer {token}",
                                               "Accept": "application/json"})
    except Exception:
        return "allowed"  # the view itself ran (and failed on dummy arguments)
    if r.status_code == 401:
        return "unauthenticated"
    if r.status_code == 403 and DENIED_PREFIX in r.get_data(as_text=True):
        return "denied"
    return "allowed"


def test_role_by_route_table(perm_app, artifacts: Path):
    a, bearer = perm_app
    c = a.client()
    table, mismatches = [], []
    for rule, method in _routes(a.app):
        if _is_public(a.app, rule.endpoint):
            table.append((method, rule.rule, {role: "public" for role in accounts.ROLES}))
            continue
        declared = a.app.view_functions[rule.endpoint].auth_roles
        expected_roles = EXPECTED.get(rule.endpoint, None if declared == auth.ANY_ROLE
                                      else declared) or accounts.ROLES
        row = {}
        for role in accounts.ROLES:
            should = role in expected_roles
            if not should or method in SAFE_METHODS:
                got = _outcome(c, _url(a.app, rule), method, bearer[role])
            else:
                got = "allowed (declared)"  # not run: a POST with dummy data could change state
            row[role] = got
            if got.startswith("allowed") != should:
                mismatches.append(f"{method} {rule.rule} as {role}: {got}, expected "
                                  f"{'allowed' if should else 'denied'}")
        table.append((method, rule.rule, row))
    lines = ["| method | route | " + " | ".join(accounts.ROLES) + " |",
             "|---|---|" + "---|" * len(accounts.ROLES)]
    for method, route, row in table:
        lines.append(f"| {method} | `{route}` | " + " | ".join(row[r] for r in accounts.ROLES)
                     + " |")
    (artifacts / "permissions.md").write_text("\n".join(lines) + "\n")
    assert not mismatches, "\n".join(mismatches)
    assert len(table) >= len(EXPECTED)


def test_expected_areas_exist(perm_app):
    """The table above checks these endpoints; a rename must update it, not skip it."""
    endpoints = {r.endpoint for r in perm_app[0].app.url_map.iter_rules()}
    assert set(EXPECTED) <= endpoints


# -- who may see a study: (role, pool, site, grant) x every route with patient data ---------------
# A study of "Other Hospital" read by the radiologists' pool, with a signed report, a critical
# finding and a consult. Outsiders (outside the pool, or of another site) try every route marked
# @permissions.patient_data, found in the URL map: each must answer 403/404 naming no patient,
# audit the denial and change nothing; the reader in the pool and a break-glass holder get in.
PATIENT = ("OUTSIDER", "PID-OUT-7", "ACC-OUT-7")
OUTSIDERS = {  # username: (role, tags)
    "out-pool": ("neurologist", ""),  # right site (no site tag), not in the radiologists' pool
    "out-site": ("radiologist", "site:Field Hospital"),  # in the pool, another site
    "out-staff": ("site_staff", "site:Field Hospital"),
    "out-admin": ("admin", "site:Field Hospital"),
    "out-resp": ("responder", "site:Field Hospital"),
}
GRANTED = ("granted", "neurologist", "site:Field Hospital")  # outside both, with break-glass


@dataclass
class World:
    a: AuthApp
    tokens: dict[str, str]
    study: str
    series: str
    sop: str
    item: int
    report: int
    finding: int
    consult: int
    participant: int
    ours: str  # a study of the outsiders' own site ("Field Hospital")

    def call(self, user: str, method: str, path: str, **kw):
        headers = {"Authorization": f"Bearer {self.tokens[user]}", "Accept": "application/json",
                   **kw.pop("headers", {})}
        return self.a.client().open(path, method=method, headers=headers, **kw)

    def stow_body(self) -> tuple[bytes, str]:
        """A STOW-RS request carrying one instance of the outsiders' target study."""
        conn = self.a.db()
        path = conn.execute("SELECT path FROM instances WHERE sop_uid = ?",
                            (self.sop,)).fetchone()[0]
        conn.close()
        data = (self.a.data_dir / "studies" / path).read_bytes()
        body = (b"--XB\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--XB--\r\n")
        return body, 'multipart/related; type="application/dicom"; boundary=XB'


def _ingest(a: AuthApp, **kw) -> str:
    from reporting_site import ingest_study

    return ingest_study(a, 2, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from appliance.core import config
    from appliance.reading import read_queue

    a = make_auth_app(tmp_path_factory.mktemp("world"))
    a.app.config["CONSULT_STREAM_S"] = 0.2
    a.add_user("insider", "radiologist")
    for name, (role, tags) in OUTSIDERS.items():
        a.add_user(name, role, tags=tags)
    a.add_user(GRANTED[0], GRANTED[1], tags=GRANTED[2])
    tokens_ = {u: a.token(u) for u in ("insider", GRANTED[0], *OUTSIDERS)}
    study = _ingest(a, institution="Other Hospital", patient_name="OUTSIDER^PAT",
                    patient_id="PID-OUT-7", accession="ACC-OUT-7", study_description="CT HEAD")
    ours = _ingest(a, institution="Field Hospital", patient_name="OURS^PAT", patient_id="PID-OURS")
    conn = a.db()
    read_queue._SETS.clear()
    read_queue.run_once(conn, config.load(a.data_dir).workflows_dir, a.clock(), 30.0)
    item = conn.execute("SELECT id FROM read_items WHERE study_uid = ?", (study,)).fetchone()[0]
    conn.execute("UPDATE read_items SET pool = 'radiologists', pool_roles = 'radiologist',"
                 " pool_tags = '' WHERE id = ?", (item,))
    series, sop = conn.execute("SELECT series_uid, sop_uid FROM instances WHERE study_uid = ?",
                               (study,)).fetchone()
    conn.close()
    w = World(a, tokens_, study, series, sop, item, 0, 0, 0, 0, ours)
    assert w.call("insider", "POST", f"/api/v1/worklist/items/{item}/claim").status_code == 200
    r = w.call("insider", "GET", f"/reports/item/{item}")
    w.report = int(r.headers["Location"].rsplit("/", 1)[1])
    assert w.call("insider", "POST", f"/reports/{w.report}/autosave", json={
        "revision": 0, "template_id": "generic", "findings": "Hyperdense left MCA.",
        "impression": "Acute stroke."}).status_code == 200
    assert w.call("insider", "POST", f"/reports/{w.report}/sign",
                  json={"level": "final"}).status_code == 200
    r = w.call("insider", "POST", f"/reports/{w.report}/critical",
               json={"description": "Acute left MCA occlusion"})
    w.finding = r.get_json()["finding_id"]
    r = w.call("insider", "POST", "/consults", json={"study_uid": study})
    assert r.status_code == 201, r.get_data(as_text=True)
    w.consult = r.get_json()["id"]
    w.participant = w.call("insider", "POST", f"/consults/{w.consult}/join").get_json()[
        "participant"]
    r = w.call(GRANTED[0], "POST", "/break-glass",
               data={"study": study, "reason": "stroke alert, covering tonight"})
    assert r.status_code == 302, r.get_data(as_text=True)
    return w


def _args(w: World, rule) -> dict[str, object]:
    values = {"study": w.study, "series": w.series, "sop": w.sop, "frame_list": "1", "frame": 1,
              "tag": "7FE00010", "item_id": w.item, "rid": w.report, "fid": w.finding,
              "cid": w.consult, "pid": w.participant, "patient_ref": 1}
    missing = set(rule.arguments) - set(values)
    assert not missing, f"{rule.rule}: give the matrix a value for {sorted(missing)}"
    return {k: values[k] for k in rule.arguments}


def _patient_routes(app):
    for rule, method in _routes(app):
        if getattr(app.view_functions[rule.endpoint], "patient_data", None):
            yield rule, method


# Everything a request would need to succeed if nothing checked the caller.
BODY = {"study_uid": "", "state": "cancelled", "text": "Addendum: also a small bleed.",
        "description": "Acute finding", "level": "final", "revision": 1, "reason": "x",
        "note": "n", "fields": {}, "findings": "Overwritten.", "allow": True, "seconds": 5,
        "to": 1, "data": {"sdp": "x"}, "step": "video", "samples": []}


def _accept(rule) -> str:
    """What a real client asks for at that URL (so a refusal is not a 406)."""
    if rule.rule.endswith(("/rendered", "/thumbnail")):
        return "image/jpeg"
    if "/frames/" in rule.rule or "/bulkdata/" in rule.rule:
        return 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    if rule.endpoint.startswith("dicomweb.retrieve_"):
        return 'multipart/related; type="application/dicom"; transfer-syntax=*'
    return "application/json"


def _request(w: World, user: str, rule, method: str):
    with w.a.app.test_request_context():
        url = url_for(rule.endpoint, **_args(w, rule))
    if method != "POST":
        return w.call(user, method, url, headers={"Accept": _accept(rule)})
    if rule.endpoint.startswith("dicomweb.store"):
        body, ctype = w.stow_body()
        return w.call(user, method, url, data=body, headers={"Content-Type": ctype})
    return w.call(user, method, url, json={**BODY, "study_uid": w.study})


def _state(w: World) -> dict[str, object]:
    conn = w.a.db()
    try:
        return {t: conn.execute(q).fetchall() for t, q in {
            "reports": "SELECT id, status, revision, findings FROM reports ORDER BY id",
            "item": "SELECT state, claimed_by, read_at FROM read_items ORDER BY id",
            "consults": "SELECT id, ended_at FROM consults ORDER BY id",
            "participants": "SELECT id, state FROM consult_participants ORDER BY id",
            "findings": "SELECT id, acknowledged_at FROM critical_findings ORDER BY id",
            "instances": "SELECT count(*) FROM instances",
            "deliveries": "SELECT count(*) FROM deliveries",
            "media_jobs": "SELECT count(*) FROM consult_media_jobs",
            "chat": "SELECT count(*) FROM consult_events WHERE kind != 'presence'",
        }.items()}
    finally:
        conn.close()


def _denials(w: World, user: str) -> int:
    conn = w.a.db()
    n = conn.execute("SELECT count(*) FROM audit WHERE actor = ? AND outcome = 'denied'",
                     (user,)).fetchone()[0]
    conn.close()
    return n


def test_every_route_says_whether_it_touches_patient_data(world: World):
    """A route added without @permissions.patient_data (or a reason it has none) fails."""
    app = world.a.app
    unmarked = sorted({r.endpoint for r, _ in _routes(app)
                       if not getattr(app.view_functions[r.endpoint], "patient_data", None)
                       and r.endpoint not in permissions.NO_PATIENT_DATA
                       and r.endpoint not in permissions.PUBLIC_ENDPOINTS})
    assert not unmarked, ("mark these @permissions.patient_data(...) and check the study, or "
                          "list them in permissions.NO_PATIENT_DATA with the reason:\n"
                          + "\n".join(unmarked))
    endpoints = {r.endpoint for r in app.url_map.iter_rules()}
    assert set(permissions.NO_PATIENT_DATA) <= endpoints, "stale NO_PATIENT_DATA entries"


@pytest.mark.parametrize("outsider", sorted(OUTSIDERS))
def test_outsider_gets_no_patient_data_from_any_route(world: World, outsider: str):
    """Every marked route, for a reader outside the pool, a reader/staff/admin/responder of
    another site: 403 or 404, no patient named, the denial audited, nothing changed."""
    before, holes = _state(world), []
    routes = list(_patient_routes(world.a.app))
    assert len(routes) > 40
    for rule, method in routes:
        denials = _denials(world, outsider)
        r = _request(world, outsider, rule, method)
        body = r.get_data(as_text=True)
        leaked = [p for p in PATIENT if p in body]
        listing = world.a.app.view_functions[rule.endpoint].patient_data == "list"
        refused = r.status_code in (403, 404) or (
            rule.endpoint == "dicomweb.store_instances" and r.status_code == 409
            and '"Value": [292]' in body.replace('"Value":[292]', '"Value": [292]'))
        if leaked or not (refused or (listing and r.status_code == 200)):
            holes.append(f"{method} {rule.rule}: {r.status_code} {leaked} {body[:120]!r}")
        elif r.status_code == 403 and _denials(world, outsider) == denials:
            holes.append(f"{method} {rule.rule}: refused but not audited")
    assert not holes, f"{outsider}:\n" + "\n".join(holes)
    assert _state(world) == before


def test_reader_in_pool_and_break_glass_holder_open_every_read_route(world: World):
    """The same URLs work for the reader of the study and, with a grant, for an outsider:
    the refusals above are the permission, not a broken URL."""
    app, bad = world.a.app, []
    for rule, method in _patient_routes(app):
        if method != "GET" or rule.endpoint.startswith(("consults.events",)):
            continue
        kind = app.view_functions[rule.endpoint].patient_data
        users = ["insider"] + ([GRANTED[0]] if kind in ("study", "report") else [])
        for user in users:
            r = _request(world, user, rule, method)
            if r.status_code == 403 and DENIED_PREFIX in r.get_data(as_text=True):
                continue  # a role without this area at all (the role table covers it)
            if r.status_code >= 400:
                bad.append(f"{user} GET {rule.rule}: {r.status_code} {r.get_data()[:100]!r}")
    assert not bad, "\n".join(bad)


def test_site_scoped_readers_break_glass_grant_shows_the_study_in_qido(world: World):
    """OHIF finds a study by QIDO first: a grant that did not show it there opened nothing."""
    found = world.call(GRANTED[0], "GET", "/dicom-web/studies").get_json()
    uids = {s["0020000D"]["Value"][0] for s in found}
    assert world.study in uids and world.ours in uids
    found = world.call("out-site", "GET", "/dicom-web/studies").get_json()
    assert {s["0020000D"]["Value"][0] for s in found} == {world.ours}
    found = world.call("out-pool", "GET", "/dicom-web/studies").get_json()
    assert {s["0020000D"]["Value"][0] for s in found} == {world.ours}  # no item: site only


def test_reader_outside_pool_cannot_addend_report(world: World):
    """Walking report ids: the addendum would name the patient, sign an SR into their study
    and raise a critical finding. Refused, audited, nothing written."""
    before = _state(world)
    for user in ("out-pool", "out-site"):
        r = world.call(user, "POST", f"/reports/{world.report}/addendum",
                       json={"text": "Addendum: no bleed."})
        assert r.status_code == 403 and "OUTSIDER" not in r.get_data(as_text=True)
        assert "break-glass" in r.get_json()["error"]
    assert _state(world) == before
    conn = world.a.db()
    row = conn.execute("SELECT object, detail FROM audit WHERE actor = 'out-pool' AND action ="
                       " 'report.addendum' AND outcome = 'denied'").fetchone()
    conn.close()
    assert row and row[0] == world.study and "reading pool" in row[1]


def _queued_study(w: World, patient: str) -> tuple[str, int]:
    """A new study of Other Hospital waiting in the radiologists' pool."""
    from appliance.core import config
    from appliance.reading import read_queue

    uid = _ingest(w.a, institution="Other Hospital", patient_name=patient,
                  patient_id="PID-OUT-7")
    conn = w.a.db()
    read_queue.run_once(conn, config.load(w.a.data_dir).workflows_dir, w.a.clock(), 30.0)
    item = conn.execute("SELECT id FROM read_items WHERE study_uid = ?", (uid,)).fetchone()[0]
    conn.execute("UPDATE read_items SET pool = 'radiologists', pool_roles = 'radiologist',"
                 " pool_tags = '' WHERE id = ?", (item,))
    conn.close()
    return uid, item


def test_scope_all_worklist_lists_items_outside_pool_or_site_without_their_patients(world):
    uid, _item = _queued_study(world, "OUTSIDER^QUEUED")
    for user in ("out-pool", "out-site"):
        r = world.call(user, "GET", "/worklist/items?scope=all")
        items = {i["study_uid"]: i for i in r.get_json()["items"]}
        assert not items[uid]["eligible"] and items[uid]["patient_name"] == ""
        assert items[uid]["open_url"].startswith("/break-glass?study=")
        assert not any(p in r.get_data(as_text=True) for p in PATIENT)
        r = world.call(user, "GET", "/worklist/items")
        assert uid not in r.get_data(as_text=True)
        r = world.call(user, "GET", "/api/v1/worklist/items")
        listed = {i["study_uid"]: i for i in r.get_json()["items"]}
        assert listed[uid]["restricted"] and listed[uid]["patient_name"] is None
        assert not any(p in r.get_data(as_text=True) for p in PATIENT)
    r = world.call("insider", "GET", "/api/v1/worklist/items")
    assert "OUTSIDER^QUEUED" in r.get_data(as_text=True)


def test_consult_from_another_sites_study_is_refused_and_names_no_patient(world: World):
    before = _state(world)
    r = world.call("out-staff", "POST", "/consults", json={"study_uid": world.study})
    assert r.status_code == 403 and "OUTSIDER" not in r.get_data(as_text=True)
    r = world.call("out-staff", "GET", "/consults", headers={"Accept": "text/html"})
    assert r.status_code == 200 and "OUTSIDER" not in r.get_data(as_text=True)
    r = world.call("out-site", "POST", f"/consults/{world.consult}/join")
    assert r.status_code == 403 and "chat" not in r.get_data(as_text=True)
    assert _state(world) == before
    r = world.call("out-staff", "POST", "/consults", json={"study_uid": world.ours})
    assert r.status_code == 201  # their own site's study: allowed


def test_site_staff_report_list_shows_only_their_sites_reports(world: World):
    r = world.call("out-staff", "GET", "/reports", headers={"Accept": "text/html"})
    assert r.status_code == 200 and "OUTSIDER" not in r.get_data(as_text=True)
    assert f"/reports/{world.report}" not in r.get_data(as_text=True)
    r = world.call("out-staff", "GET", "/critical", headers={"Accept": "text/html"})
    assert "OUTSIDER" not in r.get_data(as_text=True)
    assert world.call("out-staff", "GET", "/critical/open").get_json()["open"] == []


def test_stow_into_another_sites_study_is_refused(world: World):
    """Pushing an object into another site's study: refused per part (0x0124) or whole."""
    body, ctype = world.stow_body()
    before = _state(world)
    r = world.call("out-site", "POST", "/dicom-web/studies", data=body,
                   headers={"Content-Type": ctype})
    assert r.status_code == 409
    failed = r.get_json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0x0124]
    r = world.call("out-site", "POST", f"/dicom-web/studies/{world.study}", data=body,
                   headers={"Content-Type": ctype})
    assert r.status_code == 403
    assert _state(world) == before


def test_claim_holder_cannot_set_final_or_delivered_through_the_api(world: World):
    """``final`` with no report would stop escalation and count a read in SLA; ``delivered``
    would say the PACS has it. Only signing and delivery move an item there."""
    _uid, item = _queued_study(world, "SECOND^PAT")
    assert world.call("insider", "POST", f"/api/v1/worklist/items/{item}/claim"
                      ).status_code == 200
    before = _state(world)
    for state in ("final", "delivered", "preliminary"):
        r = world.call("insider", "POST", f"/api/v1/worklist/items/{item}/state",
                       json={"state": state})
        assert r.status_code == 409, r.get_data(as_text=True)
        assert "signing the report" in r.get_json()["error"]
    assert _state(world) == before
    r = world.call("insider", "GET", f"/api/v1/worklist/items/{item}").get_json()["item"]
    assert r["state"] == "claimed" and r["read_at"] is None


def test_decide_is_the_pool_and_site_rule():
    """The one function, alone: role, pool (``Pool.admits``), site tags, grant."""
    from workflows.schema import Pool

    pool = Pool("neuro", ("neurologist",), ("stroke",))
    study = permissions.Study("1.2", "North Hospital", pool)
    neuro = {"username": "n", "role": "neurologist", "tags": "stroke,site:North Hospital"}
    assert permissions.decide(neuro, study)
    assert not permissions.decide({**neuro, "tags": "site:North Hospital"}, study)
    assert not permissions.decide({**neuro, "tags": "stroke,site:South"}, study)
    assert permissions.decide({**neuro, "tags": "site:South"}, study, granted=True)
    assert permissions.decide({"username": "r", "role": "radiologist", "tags": ""},
                              permissions.Study("1.2", "X", pool, claimed_by="r"))
    assert permissions.decide({"role": "site_staff", "tags": "site:north hospital"}, study)
    assert not permissions.decide({"role": "site_staff", "tags": "site:South"}, study)
    assert not permissions.decide(None, study)
