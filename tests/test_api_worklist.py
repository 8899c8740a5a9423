"""``/api/v1`` worklist JSON through Flask's test client with real bearer tokens and sessions:
listing with filters in due order, claim/renew/release and their conflicts, history, auth
errors, turnaround metrics, the inbox, and the audit of every listing."""

from __future__ import annotations

import pytest
from test_auth import AuthApp, login, make_auth_app
from test_read_queue import index_study

from appliance.core import audit
from appliance.reading import read_queue

T0 = 1_800_000_000.0


class Api:
    def __init__(self, a: AuthApp):
        self.a = a
        self.tokens: dict[str, str] = {}

    def as_(self, user: str, method: str, path: str, headers_extra: dict | None = None, **kw):
        if user not in self.tokens:
            self.tokens[user] = self.a.token(user)
        headers = {"Authorization": f"Bearer {self.tokens[user]}", "Accept": "application/json",
                   **(headers_extra or {})}
        return getattr(self.a.client(), method)(path, headers=headers, **kw)


@pytest.fixture
def api(tmp_path) -> Api:
    a = make_auth_app(tmp_path)  # init puts disaster-default.yaml in workflows/
    a.clock.t = T0
    a.add_user("rad1", "radiologist")
    a.add_user("rad2", "radiologist")
    a.add_user("neuro1", "neurologist", tags="neuro")
    a.add_user("staff1", "site_staff")
    a.add_user("resp1", "responder")
    conn = a.db()
    try:
        read_queue._SETS.clear()
        index_study(conn, "1.2.3.1", at=T0 - 600, body_part="CHEST",
                    study_description="CT CHEST")  # routine, 60 min
        index_study(conn, "1.2.3.2", at=T0 - 300)  # CT head: stat, 30 min
        index_study(conn, "1.2.3.3", at=T0 - 200, modality="CR", body_part="CHEST",
                    study_description="CHEST PA")  # routine
        read_queue.run_once(conn, a.data_dir / "workflows", T0, 30.0)
    finally:
        conn.close()
    return Api(a)


def ids(resp) -> list[str]:
    return [i["study_uid"] for i in resp.get_json()["items"]]


def item_id(api: Api, uid: str) -> int:
    items = api.as_("rad1", "get", "/api/v1/worklist/items").get_json()["items"]
    return next(i["id"] for i in items if i["study_uid"] == uid)


def test_list_sorted_by_due_with_filters(api: Api):
    r = api.as_("rad1", "get", "/api/v1/worklist/items")
    assert r.status_code == 200
    assert ids(r) == ["1.2.3.2", "1.2.3.1", "1.2.3.3"]  # stat due T0+1500 first
    first = r.get_json()["items"][0]
    assert first["priority"] == "stat" and first["pool"]["name"] == "radiologists"
    assert first["patient_name"] == "DOE^JANE"
    assert ids(api.as_("rad1", "get", "/api/v1/worklist/items?modality=CR")) == ["1.2.3.3"]
    assert ids(api.as_("rad1", "get", "/api/v1/worklist/items?priority=stat")) == ["1.2.3.2"]
    assert ids(api.as_("rad1", "get", "/api/v1/worklist/items?pool=radiologists&limit=1")) == [
        "1.2.3.2"]
    assert ids(api.as_("rad1", "get", "/api/v1/worklist/items?breached=true")) == []
    assert ids(api.as_("neuro1", "get", "/api/v1/worklist/items?eligible=1")) == []
    bad = api.as_("rad1", "get", "/api/v1/worklist/items?state=lost")
    assert bad.status_code == 400 and "unknown state" in bad.get_json()["error"]
    conn = api.a.db()
    listed = [r for r in audit.rows(conn) if r["action"] == "worklist.list"]
    conn.close()
    assert listed and listed[0]["actor"] == "rad1" and listed[0]["source"] == "127.0.0.1"


def test_list_answers_304_while_unchanged_and_200_after_a_change(api: Api):
    r = api.as_("rad1", "get", "/api/v1/worklist/items")
    tag = r.headers["ETag"]
    again = api.as_("rad1", "get", "/api/v1/worklist/items", headers_extra={"If-None-Match": tag})
    assert again.status_code == 304 and again.data == b""
    assert api.as_("rad2", "get", "/api/v1/worklist/items",
                   headers_extra={"If-None-Match": tag}).status_code == 200  # another reader
    api.as_("rad1", "post", f"/api/v1/worklist/items/{item_id(api, '1.2.3.2')}/claim")
    after = api.as_("rad1", "get", "/api/v1/worklist/items", headers_extra={"If-None-Match": tag})
    assert after.status_code == 200 and after.get_json()["items"][0]["claimed_by"] == "rad1"


def test_auth_errors(api: Api):
    c = api.a.client()
    r = c.get("/api/v1/worklist/items", headers={"Accept": "application/json"})
    assert r.status_code == 401
    assert api.as_("staff1", "get", "/api/v1/worklist/items").status_code == 403
    stat = item_id(api, "1.2.3.2")
    assert api.as_("resp1", "post", f"/api/v1/worklist/items/{stat}/claim").status_code == 403


def test_claim_renew_release_and_history(api: Api):
    stat = item_id(api, "1.2.3.2")
    r = api.as_("rad1", "post", f"/api/v1/worklist/items/{stat}/claim")
    assert r.status_code == 200
    item = r.get_json()["item"]
    assert item["claimed_by"] == "rad1" and item["claim_expires_at"] == T0 + 1200
    r = api.as_("rad2", "post", f"/api/v1/worklist/items/{stat}/claim")
    assert r.status_code == 409 and "claimed by rad1" in r.get_json()["error"]
    r = api.as_("neuro1", "post", f"/api/v1/worklist/items/{item_id(api, '1.2.3.1')}/claim")
    assert r.status_code == 403 and "not in pool radiologists" in r.get_json()["error"]
    api.a.clock.advance(600)
    r = api.as_("rad1", "post", f"/api/v1/worklist/items/{stat}/renew")
    assert r.status_code == 200 and r.get_json()["item"]["claim_expires_at"] == T0 + 1800
    assert api.as_("rad2", "post", f"/api/v1/worklist/items/{stat}/renew").status_code == 409
    r = api.as_("rad1", "post", f"/api/v1/worklist/items/{stat}/release",
                json={"reason": "needs neuro"})
    assert r.status_code == 200 and r.get_json()["item"]["state"] == "queued"
    assert api.as_("rad1", "post", "/api/v1/worklist/items/999/claim").status_code == 404
    hist = api.as_("rad2", "get", f"/api/v1/worklist/items/{stat}/history").get_json()["history"]
    assert [(h["event"], h["actor"]) for h in hist] == [
        ("created", "system:read-queue"), ("complete", "system:read-queue"),
        ("claimed", "rad1"), ("renewed", "rad1"), ("released", "rad1")]
    assert hist[-1]["detail"]["reason"] == "needs neuro"
    mine = api.as_("rad1", "get", "/api/v1/worklist/items?mine=1")
    assert ids(mine) == []


def test_session_login_claims_too(api: Api):
    c = api.a.client()
    login(api.a, c, "rad2")
    stat = item_id(api, "1.2.3.2")
    r = c.post(f"/api/v1/worklist/items/{stat}/claim", headers={"Accept": "application/json"})
    assert r.status_code == 400 and "CSRF" in r.get_json()["error"]  # a cookie alone is not enough
    page = c.get("/api/v1/worklist/items", headers={"Accept": "application/json"})
    assert page.status_code == 200


def test_turnaround_and_state_changes(api: Api):
    routine = item_id(api, "1.2.3.1")
    api.as_("rad1", "post", f"/api/v1/worklist/items/{routine}/claim")
    api.a.clock.advance(1200)
    # The read is made by signing a report (the /state API may not set final: see
    # test_permissions.py::test_claim_holder_cannot_set_final_or_delivered_through_the_api).
    r = api.as_("rad1", "get", f"/reports/item/{routine}")
    rid = int(r.headers["Location"].rsplit("/", 1)[1])
    r = api.as_("rad1", "post", f"/reports/{rid}/autosave",
                json={"revision": 0, "template_id": "generic", "findings": "No acute finding.",
                      "impression": "Normal."})
    assert r.status_code == 200, r.get_data(as_text=True)
    r = api.as_("rad1", "post", f"/reports/{rid}/sign", json={"level": "final"})
    assert r.status_code == 200 and r.get_json()["status"] == "final", r.get_data(as_text=True)
    assert api.as_("rad1", "get", f"/api/v1/worklist/items/{routine}").get_json()["item"][
        "state"] == "final"
    r = api.as_("rad1", "post", f"/api/v1/worklist/items/{item_id(api, '1.2.3.3')}/state",
                json={"state": "cancelled"})
    assert r.status_code == 403
    r = api.as_("resp1", "post", f"/api/v1/worklist/items/{routine}/release-hold")
    assert r.status_code == 409 and "not held" in r.get_json()["error"]
    assert api.as_("rad1", "post", f"/api/v1/worklist/items/{routine}/release-hold"
                   ).status_code == 403
    r = api.as_("resp1", "post", f"/api/v1/worklist/items/{item_id(api, '1.2.3.3')}/state",
                json={"state": "cancelled", "note": "duplicate"})
    assert r.status_code == 200 and r.get_json()["item"]["state"] == "cancelled"
    t = api.as_("rad1", "get", "/api/v1/metrics/turnaround?hours=1").get_json()
    assert t["read"] == 1 and t["within_sla"] == 1 and t["within_sla_share"] == 1.0
    assert t["p50_minutes"] == pytest.approx(30.0)  # first image T0-600, read at T0+1200
    assert api.as_("staff1", "get", "/api/v1/metrics/turnaround").status_code == 403
    assert api.as_("rad1", "get", "/api/v1/metrics/turnaround?since=5&until=1").status_code \
        == 400


def test_inbox(api: Api):
    conn = api.a.db()
    try:
        read_queue.run_once(conn, api.a.data_dir / "workflows", T0 + 1500, 30.0)  # stat breached
    finally:
        conn.close()
    r = api.as_("rad1", "get", "/api/v1/notifications?unread=1").get_json()["notifications"]
    kinds = {n["kind"] for n in r}
    assert {"escalation", "breach"} <= kinds
    marked = api.as_("rad1", "post", "/api/v1/notifications/read",
                     json={"ids": [n["id"] for n in r]}).get_json()["marked"]
    assert marked == len(r)
    assert api.as_("rad1", "get", "/api/v1/notifications?unread=1").get_json()[
        "notifications"] == []
    breached = api.as_("rad1", "get", "/api/v1/worklist/items?breached=1")
    assert ids(breached) == ["1.2.3.2"]
