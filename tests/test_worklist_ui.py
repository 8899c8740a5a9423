"""The worklist page and its JSON through Flask's test client: order, SLA colours at a fake
time, filters, pools and break-glass links, one-click claim/release with CSRF, the dashboard."""

from __future__ import annotations

import re

import pytest
from test_auth import HTML, AuthApp, login, make_auth_app

from appliance.reading import worklist

T0 = 1_800_000_000.0


def seed(conn, items: list[dict]) -> list[int]:
    """Studies and read items written straight into the tables (the read queue's output)."""
    ids = []
    for i, it in enumerate(items):
        uid = it.get("uid", f"1.2.826.0.1.3680043.10.999.{i}")
        conn.execute(
            "INSERT INTO studies (study_uid, patient_id, patient_name, study_description,"
            " accession_number, institution_name, modalities, num_series, num_instances,"
            " first_received, last_received) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (uid, f"PID{i}", it.get("name", f"DOE^PAT{i}"), it.get("desc", "CT HEAD"),
             f"ACC{i}", it.get("site", "North Field Hospital"), it.get("modality", "CT"), 1,
             it.get("images", 120), it["first"], it["first"]))
        conn.execute("INSERT INTO series (series_uid, study_uid, modality, body_part,"
                     " num_instances) VALUES (?,?,?,?,?)",
                     (uid + ".1", uid, it.get("modality", "CT"), it.get("body", "HEAD"), 120))
        sla = it.get("sla", 60)
        cur = conn.execute(
            "INSERT INTO read_items (study_uid, priority, priority_rank, sla_minutes,"
            " first_received, due_at, created_at, updated_at, pool, pool_roles, pool_tags,"
            " modalities, instances_seen, late_instances, breached) VALUES"
            " (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (uid, it.get("priority", "routine"), {"stat": 0, "urgent": 1, "routine": 2}[
                it.get("priority", "routine")], sla, it["first"], it["first"] + sla * 60,
             it["first"], it["first"], it.get("pool", "general"),
             it.get("roles", "radiologist,neurologist"), it.get("tags", ""),
             it.get("modality", "CT"), it.get("images", 120), it.get("late", 0),
             int(it.get("breached", False))))
        ids.append(cur.lastrowid)
    return ids


@pytest.fixture
def wl(tmp_path) -> AuthApp:
    a = make_auth_app(tmp_path)
    a.clock.t = T0
    a.add_user("rad1", "radiologist", display_name="Dr One")
    a.add_user("rad2", "radiologist")
    a.add_user("staff1", "site_staff")
    conn = a.db()
    seed(conn, [
        {"uid": "1.2.3.routine", "first": T0 - 10 * 60, "sla": 60},            # 50 min left
        {"uid": "1.2.3.stroke", "first": T0 - 20 * 60, "sla": 30, "priority": "stat",
         "desc": "CT HEAD STROKE", "late": 2},                                   # 10 min left
        {"uid": "1.2.3.breached", "first": T0 - 90 * 60, "sla": 60, "breached": True,
         "modality": "MR", "body": "SPINE"},
        {"uid": "1.2.3.neuro-only", "first": T0 - 5 * 60, "roles": "neurologist"},
        {"uid": "1.2.3.north", "first": T0 - 5 * 60, "tags": "site:north"},
    ])
    conn.close()
    return a


def _rows(html: str) -> list[tuple[str, str]]:
    """(css class, patient cell) of each worklist row, in page order."""
    return re.findall(r'<tr class="(\w+)" data-id="\d+" data-due="[^"]+"', html)


def test_reader_sees_own_pool_sorted_by_due_with_sla_colours(wl: AuthApp):
    c = wl.client()
    login(wl, c, "rad1")
    wl.clock.t = T0  # login() moved the clock by one TOTP step; put it back
    r = c.get("/worklist", headers=HTML)
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert _rows(html) == ["breached", "amber", "green"]  # due order; neuro-only, north hidden
    assert "CT HEAD STROKE" in html and "late images" in html and "SPINE" in html
    assert "/viewer?StudyInstanceUIDs=1.2.3.stroke" in html
    assert "North Field Hospital" in html
    assert "neuro-only" not in html and "1.2.3.north" not in html
    assert 'src="/static/worklist.js"' in html and 'name="csrf-token"' in html


def test_items_json_filters_and_scope_all_links_through_break_glass(wl: AuthApp):
    c = wl.client()
    login(wl, c, "rad1")
    items = c.get("/worklist/items").get_json()["items"]
    assert [i["study_uid"] for i in items] == ["1.2.3.breached", "1.2.3.stroke", "1.2.3.routine"]
    stroke = items[1]
    assert stroke["priority"] == "stat" and stroke["late"] and stroke["body_part"] == "HEAD"
    assert stroke["images"] == 120 and stroke["site"] == "North Field Hospital"
    assert [i["study_uid"] for i in c.get("/worklist/items?priority=stat").get_json()["items"]] \
        == ["1.2.3.stroke"]
    assert [i["study_uid"] for i in c.get("/worklist/items?modality=MR").get_json()["items"]] \
        == ["1.2.3.breached"]
    assert [i["study_uid"] for i in c.get("/worklist/items?breached=1").get_json()["items"]] \
        == ["1.2.3.breached"]
    everything = c.get("/worklist/items?scope=all").get_json()["items"]
    outside = {i["study_uid"]: i for i in everything if not i["eligible"]}
    assert set(outside) == {"1.2.3.neuro-only", "1.2.3.north"}
    assert outside["1.2.3.north"]["open_url"].startswith("/break-glass?study=1.2.3.north&next=")
    bad = c.get("/worklist/items?state=bogus")
    assert bad.status_code == 400 and "unknown state filter" in bad.get_json()["error"]
    assert c.get("/worklist/items?priority=whenever").status_code == 400


def test_claim_and_release_in_one_click(wl: AuthApp):
    c1, c2 = wl.client(), wl.client("10.0.0.2")
    login(wl, c1, "rad1")
    login(wl, c2, "rad2")
    item_id = c1.get("/worklist/items").get_json()["items"][1]["id"]
    token1 = re.search(r'name="csrf-token" content="([^"]+)"',
                       c1.get("/worklist", headers=HTML).get_data(as_text=True)).group(1)
    # Without the CSRF header: refused, nothing claimed.
    assert c1.post(f"/worklist/{item_id}/claim", json={}).status_code == 400
    conn = wl.db()
    assert worklist.get_item(conn, item_id)["state"] == "queued"
    wl.app.config["SITE"]["worker"]["claim_lease_s"] = 600  # the site's lease, not a default
    r = c1.post(f"/worklist/{item_id}/claim", json={}, headers={"X-CSRF-Token": token1})
    assert r.status_code == 200
    got = r.get_json()["item"]
    assert got["state"] == "claimed" and got["mine"] and got["claimed_by"] == "rad1"
    assert got["claim_expires_at"] == wl.clock.t + 600
    token2 = re.search(r'name="csrf-token" content="([^"]+)"',
                       c2.get("/worklist", headers=HTML).get_data(as_text=True)).group(1)
    r = c2.post(f"/worklist/{item_id}/claim", json={}, headers={"X-CSRF-Token": token2})
    assert r.status_code == 409 and "claimed by rad1" in r.get_json()["error"]
    r = c2.post(f"/worklist/{item_id}/release", json={}, headers={"X-CSRF-Token": token2})
    assert r.status_code == 403
    r = c1.post(f"/worklist/{item_id}/release", json={}, headers={"X-CSRF-Token": token1})
    assert r.status_code == 200 and r.get_json()["item"]["state"] == "queued"
    actions = [r[0] for r in conn.execute("SELECT action FROM audit WHERE actor='rad1'")]
    conn.close()
    assert "read_item.claim" in actions and "read_item.release" in actions
    assert "worklist.view" in actions
    assert c1.post("/worklist/99999/claim", json={},
                   headers={"X-CSRF-Token": token1}).status_code == 404


def test_polling_is_not_activity_and_audited_once_per_five_minutes(wl: AuthApp):
    c = wl.client()
    login(wl, c, "rad1")
    conn = wl.db()

    def views() -> int:
        return conn.execute("SELECT count(*) FROM audit WHERE action='worklist.view'"
                            " AND actor='rad1'").fetchone()[0]

    for _ in range(3):
        assert c.get("/worklist/items", headers={"X-Background": "1"}).status_code == 200
    assert views() == 1  # the first poll is recorded, the next ones within 5 min are not
    wl.clock.advance(301)
    assert c.get("/worklist", headers=HTML).status_code == 200
    assert views() == 2
    detail = conn.execute("SELECT detail FROM audit WHERE action='worklist.view'"
                          " ORDER BY id DESC").fetchone()[0]
    assert "1.2.3.stroke" in detail  # which patients' studies were on screen
    conn.close()
    wl.clock.advance(16 * 60)
    assert c.get("/worklist/items", headers={"X-Background": "1"}).status_code == 401


def test_an_arriving_study_says_so_on_the_page_and_in_the_json(wl: AuthApp):
    conn = wl.db()
    conn.execute("UPDATE read_items SET arriving = 1 WHERE study_uid = '1.2.3.stroke'")
    conn.commit()
    conn.close()
    c = wl.client()
    login(wl, c, "rad1")
    html = c.get("/worklist", headers=HTML).get_data(as_text=True)
    assert html.count('data-testid="arriving"') == 1 and "images arriving" in html
    items = {i["study_uid"]: i for i in c.get("/worklist/items").get_json()["items"]}
    assert items["1.2.3.stroke"]["arriving"] and not items["1.2.3.routine"]["arriving"]


def test_unchanged_refresh_answers_304_and_any_change_200(wl: AuthApp):
    c1, c2 = wl.client(), wl.client("10.0.0.2")
    login(wl, c1, "rad1")
    login(wl, c2, "rad2")
    conn = wl.db()

    def refresh(c, tag: str | None = None, query: str = ""):
        return c.get("/worklist/items" + query, headers={"X-Background": "1", **(
            {"If-None-Match": tag} if tag else {})})

    first = refresh(c1)
    tag = first.headers["ETag"]
    assert first.status_code == 200 and tag.startswith('W/"')
    again = refresh(c1, tag)
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == tag
    assert again.headers["Cache-Control"] == "no-store"
    assert refresh(c1, tag, "?priority=stat").status_code == 200  # other filters, other rows
    # Another reader with the same role never gets the first reader's tag answered.
    other = refresh(c2, tag)
    assert other.status_code == 200 and other.headers["ETag"] != tag

    def changed(sql: str, *args) -> str:
        """Make one change a reader would see; the old tag must now get the new rows."""
        nonlocal tag
        conn.execute(sql, args)
        conn.commit()
        r = refresh(c1, tag)
        assert r.status_code == 200, sql
        assert r.headers["ETag"] != tag
        tag = r.headers["ETag"]
        assert refresh(c1, tag).status_code == 304
        return r.get_json()["items"]

    stroke_id = conn.execute("SELECT id FROM read_items WHERE study_uid = '1.2.3.stroke'"
                             ).fetchone()[0]
    worklist.claim(conn, stroke_id, "rad2", wl.clock.t)  # another reader's claim
    r = refresh(c1, tag)
    assert r.status_code == 200
    assert [i["claimed_by"] for i in r.get_json()["items"] if i["id"] == stroke_id] == ["rad2"]
    tag = r.headers["ETag"]
    items = changed("UPDATE studies SET num_instances = 121 WHERE study_uid = '1.2.3.stroke'")
    assert [i["images"] for i in items if i["id"] == stroke_id] == [121]
    items = changed("UPDATE series SET body_part = 'BRAIN' WHERE study_uid = '1.2.3.stroke'")
    assert [i["body_part"] for i in items if i["id"] == stroke_id] == ["BRAIN"]
    changed("UPDATE users SET tags = 'neuro' WHERE username = 'rad1'")  # the reader's own pools
    # Every pool's rows (scope=all): a break-glass grant opens a study, and lapses unwritten.
    def north(r) -> bool:
        return [i["eligible"] for i in r.get_json()["items"] if i["study_uid"] == "1.2.3.north"
                ][0]

    r = refresh(c1, None, "?scope=all")
    assert not north(r)
    rad1 = conn.execute("SELECT id FROM users WHERE username = 'rad1'").fetchone()[0]
    conn.execute("INSERT INTO break_glass (ts, user_id, study_uid, reason, expires_at)"
                 " VALUES (?, ?, '1.2.3.north', 'stroke on call', ?)",
                 (wl.clock.t, rad1, wl.clock.t + 600))
    conn.commit()
    r = refresh(c1, r.headers["ETag"], "?scope=all")
    assert r.status_code == 200 and north(r)
    assert refresh(c1, r.headers["ETag"], "?scope=all").status_code == 304
    wl.clock.advance(601)  # the grant lapses: no write, yet the rows change
    r = refresh(c1, r.headers["ETag"], "?scope=all")
    assert r.status_code == 200 and not north(r)
    conn.close()


def test_worklist_is_for_readers_only(wl: AuthApp):
    c = wl.client()
    login(wl, c, "staff1")
    assert c.get("/worklist", headers=HTML).status_code == 403
    assert c.get("/worklist/items").status_code == 403


def test_dashboard_counts_today(wl: AuthApp):
    conn = wl.db()
    done = seed(conn, [{"uid": f"1.2.9.{i}", "first": T0 - 3600, "sla": 60} for i in range(3)])
    for n, item_id in enumerate(done):  # read 20, 40, 80 minutes after the first image
        conn.execute("UPDATE read_items SET state='final', claimed_by='rad1', claimed_at=?,"
                     " read_at=?, final_at=? WHERE id=?",
                     (T0 - 3600 + 600, T0 - 3600 + [20, 40, 80][n] * 60,
                      T0 - 3600 + [20, 40, 80][n] * 60, item_id))
    conn.close()
    wl.clock.t = T0 + 7200
    c = wl.client()
    login(wl, c, "rad2")
    d = c.get("/dashboard/data").get_json()
    assert d["since"] <= T0 - 3600  # T0 is 08:00 UTC: one local day for zones UTC-7 … UTC+13
    assert d["read"] == 3 and d["p50_minutes"] == 40 and d["within_sla"] == 2
    assert d["per_reader"] == [{"reader": "rad1", "read": 3, "median_minutes": 30.0,
                                "within_sla": 2}]
    html = c.get("/dashboard", headers=HTML).get_data(as_text=True)
    assert "rad1" in html and "within SLA" in html
