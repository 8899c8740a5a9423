"""The registration desk: CLI, JSON API, web page, trauma identities, wristbands.

Shown here: ``appliance patient register|trauma|order|list|show|wristband`` (real CLI
processes), identities from the site-prefixed sequence never reused (even after the
patient row is gone, and the database refuses to count back), bad input refused with
nothing written, fifty one-click trauma registrations through the API well inside five
minutes, the desk page's form, and a wristband PDF whose QR code decodes (poppler's
pdftoppm renders it, zbar's zbarimg reads it) to the Patient ID.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import make_site, require_tool
from test_auth import HTML, login, make_auth_app

from appliance.core import config, db
from appliance.patients import registry


def _decoded_qr(pdf: bytes, tmp: Path) -> str:
    """What a barcode reader sees on the printed band (rendered at 300 dpi)."""
    require_tool("pdftoppm")
    require_tool("zbarimg")
    (tmp / "band.pdf").write_bytes(pdf)
    subprocess.run(["pdftoppm", "-r", "300", "-png", str(tmp / "band.pdf"), str(tmp / "band")],
                   check=True, timeout=60)
    png = next(tmp.glob("band*.png"))
    out = subprocess.run(["zbarimg", "-q", "--raw", str(png)], capture_output=True, text=True,
                         timeout=60)
    return out.stdout.strip()


def _cli(monkeypatch, capsys, data_dir: Path, *args: str) -> tuple[int, str, str]:
    """``appliance …`` in this process (the same parser and functions; no interpreter start)."""
    from appliance import cli

    monkeypatch.setattr(cli, "_EXTENSIONS", [])
    code = cli.main([*args, "--data-dir", str(data_dir)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_registers_patients_trauma_identities_and_orders(tmp_path: Path, monkeypatch,
                                                             capsys):
    site = make_site(tmp_path, site_name="Camp N")
    # One real process, to show the installed command; the rest in-process.
    out = site.cli("patient", "trauma", "--count", "2", "--sex", "F", "--age-band", "adult",
                   "--procedure", "CTHEAD", "--station", "CT1", "--reason", "fall",
                   "--wristbands", str(tmp_path / "bands"), "--json", check=True)
    made = json.loads(out.stdout)
    prefix = re.sub(r"[^A-Z0-9]", "", config.load(site.data_dir)["site"]["id"].upper())[:8]
    assert [m["patient"]["patient_id"] for m in made] == [f"{prefix}-T0001", f"{prefix}-T0002"]
    assert made[0]["patient"]["name"] == "TRAUMA^T0001" and made[0]["patient"]["temporary"]
    assert made[1]["order"]["station_ae"] == "CT1" and made[1]["order"]["reason"] == "fall"
    assert _decoded_qr(Path(made[1]["wristband"]).read_bytes(), tmp_path) == f"{prefix}-T0002"

    def cli(*args: str) -> tuple[int, str, str]:
        return _cli(monkeypatch, capsys, site.data_dir, "patient", *args)

    code, out, _ = cli("register", "Doe, Jane", "--birth", "1980-02-03", "--sex", "F", "--json")
    jane = json.loads(out)["patient"]
    assert (jane["name"], jane["birth_date"], jane["patient_id"]) == \
        ("DOE^JANE", "19800203", f"{prefix}-P0001")
    code, out, _ = cli("order", jane["patient_id"], "--procedure", "CRCHEST", "--priority",
                       "STAT", "--clinical", "SOB", "--json")
    assert json.loads(out)["modality"] == "CR"

    before = cli("list", "--json")[1]
    for bad in (["register", "", "--sex", "F"], ["register", "X^Y", "--birth", "2999-01-01"],
                ["register", "X^Y", "--id", jane["patient_id"]],  # an ID already registered
                ["order", jane["patient_id"], "--procedure", "MRBRAIN"],
                ["trauma", "--age-band", "ancient"]):
        code, _, err = cli(*bad)
        assert code == 1 and err.startswith("error: "), (bad, err)
    assert cli("list", "--json")[1] == before

    shown = json.loads(cli("show", jane["patient_id"], "--json")[1])
    assert [o["procedure_code"] for o in shown["orders"]] == ["CRCHEST"]
    temps = json.loads(cli("list", "--temporary", "--json")[1])
    assert {p["patient_id"] for p in temps} == {f"{prefix}-T0001", f"{prefix}-T0002"}
    assert "TRAUMA^T0001" in cli("list")[1]
    code, _, _ = cli("wristband", jane["patient_id"], "--out", str(tmp_path / "j.pdf"))
    assert code == 0 and (tmp_path / "j.pdf").read_bytes().startswith(b"%PDF")


def test_temporary_identities_are_never_reused(tmp_path: Path):
    a = make_auth_app(tmp_path)
    cfg = config.load(a.data_dir)
    desk = registry.Site.from_config(cfg)
    conn = db.open_db(cfg.db_path)
    first = registry.register_trauma(conn, desk, actor="t")
    conn.execute("DELETE FROM patients WHERE id = ?", (first["id"],))  # even if a row went
    second = registry.register_trauma(conn, desk, actor="t")
    assert second["patient_id"].endswith("-T0002") and second["name"] == "TRAUMA^T0002"
    with pytest.raises(sqlite3.IntegrityError, match="never goes back"):
        conn.execute("UPDATE patient_sequences SET last = 0")
    conn.close()


def test_fifty_one_click_trauma_registrations_and_the_desk_page(tmp_path: Path):
    a = make_auth_app(tmp_path)
    a.add_user("desk", "site_staff")
    a.add_user("reader", "radiologist")
    token = a.token("desk")
    c = a.client()
    bearer = {"Authorization": f"Bearer {token}"}
    started = time.monotonic()
    ids = []
    for i in range(50):
        r = c.post("/api/v1/patients/trauma", headers=bearer,
                   json={"sex": "MF"[i % 2], "age_band": "adult", "procedure": "CTHEAD",
                         "priority": "STAT"})
        assert r.status_code == 201, r.get_data(as_text=True)
        ids.append(r.get_json()["patient"]["patient_id"])
    took = time.monotonic() - started
    assert len(set(ids)) == 50 and took < 60, took  # fifty in five minutes: a click each
    listed = c.get("/api/v1/patients?temporary=1", headers=bearer).get_json()
    assert len(listed) == 50 and all(p["orders"] == 1 for p in listed)

    # Refused input changes nothing; a reader has no desk.
    r = c.post("/api/v1/patients", headers=bearer, json={"name": "", "sex": "Q"})
    assert r.status_code == 400 and "name" in r.get_json()["error"]
    reader = {"Authorization": f"Bearer {a.token('reader')}"}
    assert c.post("/api/v1/patients/trauma", headers=reader, json={}).status_code == 403
    assert len(c.get("/api/v1/patients", headers=bearer).get_json()) == 50

    # The page, as a browser uses it: the form, then the new identity and its wristband.
    browser = a.client()
    login(a, browser, "desk")
    page = browser.get("/patients", headers=HTML).get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = browser.post("/api/v1/patients", headers=HTML, data={
        "csrf_token": token, "name": "Mensah^Kofi", "age": "30", "sex": "M",
        "procedure": "CRCHEST", "reason": "chest pain", "station_ae": "CR1"})
    assert r.status_code == 303
    page = browser.get(r.headers["Location"], headers=HTML).get_data(as_text=True)
    new_id = re.search(r'data-testid="new-id">([^<]+)<', page).group(1)
    band = re.search(r'href="(/patients/\d+/wristband.pdf)" data-testid="wristband"', page)
    pdf = browser.get(band.group(1))
    assert pdf.mimetype == "application/pdf" and _decoded_qr(pdf.data, tmp_path) == new_id
    # Reconciliation from the desk: JSON (a replay changes nothing), and the page's form.
    r = c.post("/api/v1/patients/link", headers=bearer, json={
        "source": ids[0], "target": new_id, "reason": "identified"})
    assert r.status_code == 200 and r.get_json()["replayed"] is False, r.get_data(as_text=True)
    r = c.post("/api/v1/patients/link", headers=bearer, json={
        "source": ids[0], "target": new_id, "reason": "identified"})
    assert r.get_json()["replayed"] is True
    assert c.post("/api/v1/patients/link", headers=bearer, json={
        "source": "NOPE", "target": new_id, "reason": "x"}).status_code == 404
    assert c.post("/api/v1/patients/link", headers=bearer, json={
        "source": new_id, "target": new_id, "reason": "x", "kind": "merge"}).status_code == 400
    r = browser.post("/api/v1/patients/link", headers=HTML, data={
        "csrf_token": token, "source": ids[1], "target": new_id, "reason": "same person"})
    assert r.status_code == 303
    linked = {p["patient_id"]: p["merged_into"] for p in c.get(
        "/api/v1/patients", headers=bearer).get_json()}
    assert linked[ids[0]] and linked[ids[0]] == linked[ids[1]]
    conn = a.db()
    audited = {r[0] for r in conn.execute("SELECT action FROM audit WHERE actor = 'desk'")}
    conn.close()
    assert {"patient.trauma", "patient.register", "order.create", "patient.list",
            "patient.wristband", "patient.link"} <= audited
