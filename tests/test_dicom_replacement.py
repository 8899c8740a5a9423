"""Replacing a stored instance (same SOP Instance UID, other bytes), by STOW-RS and by C-STORE.

Against a running site (``appliance dicom`` and ``appliance web``): a
replacement is audited with both hashes whichever way it came, and one that
would move an instance into another study or series is refused and changes
nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import requests
from conftest import make_site
from dicom_data import make_instance
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from appliance.accounts import tokens
from appliance.accounts import users as accounts
from appliance.core import audit


@pytest.fixture(autouse=True)
def send_files_verbatim(monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = make_site(tmp_path_factory.mktemp("replace"))
    s.start_dicom()
    s.start("web", wait_port=s.web_port)
    conn = s.db()
    accounts.add_user(conn, "reader", "radiologist", "reader-password-1")
    s.token = tokens.create_token(conn, "reader")
    conn.close()
    yield s
    s.stop_all()


def part10(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def c_store(site, ds, tmp_path: Path) -> int:
    path = tmp_path / f"{generate_uid()}.dcm"
    path.write_bytes(part10(ds))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", site.dicom_port, ae_title="FIELDAPP")
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def stow(site, ds) -> requests.Response:
    body = (b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + part10(ds) + b"\r\n--XX--\r\n")
    s = requests.Session()
    s.trust_env = False
    return s.post(f"https://localhost:{site.web_port}/dicom-web/studies", data=body,
                  verify=str(site.data_dir / "tls" / "ca.crt"), headers={
                      "Authorization": f"Bearer {site.token}",
                      "Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'})


def row_of(site, sop: str) -> dict:
    conn = site.db()
    try:
        return dict(conn.execute("SELECT * FROM instances WHERE sop_uid = ?", (sop,)).fetchone())
    finally:
        conn.close()


def audits(site, action: str, sop: str) -> list[dict]:
    conn = site.db()
    try:
        return [dict(r) for r in conn.execute(
            "SELECT * FROM audit WHERE action = ? AND object = ?", (action, sop))]
    finally:
        conn.close()


def sha256_of(site, rel: str) -> str:
    return hashlib.sha256((site.data_dir / "studies" / rel).read_bytes()).hexdigest()


def test_stow_replacing_a_c_stored_instance_is_audited_with_both_hashes(site, tmp_path):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    assert c_store(site, make_instance(study, series, 0, seed=1, sop_uid=sop), tmp_path) == 0
    old = row_of(site, sop)
    answer = stow(site, make_instance(study, series, 0, seed=2, sop_uid=sop))
    assert answer.status_code == 200, answer.text
    new = row_of(site, sop)
    assert new["sha256"] != old["sha256"] and new["sha256"] == sha256_of(site, new["path"])
    (row,) = audits(site, "instance.replaced", sop)
    detail = json.loads(row["detail"])
    assert row["actor"] == "reader"
    assert (detail["old_sha256"], detail["new_sha256"]) == (old["sha256"], new["sha256"])
    conn = site.db()
    assert audit.verify(conn)
    conn.close()


def test_stow_moving_an_instance_into_another_study_is_refused_and_changes_nothing(site,
                                                                                   tmp_path):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    assert c_store(site, make_instance(study, series, 0, seed=1, sop_uid=sop), tmp_path) == 0
    before = row_of(site, sop)
    elsewhere = generate_uid()
    answer = stow(site, make_instance(elsewhere, generate_uid(), 0, seed=3, sop_uid=sop))
    assert answer.status_code == 409, answer.text
    (failed,) = answer.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA900]
    assert "already stored in another study" in failed["00000902"]["Value"][0]
    assert row_of(site, sop) == before and sha256_of(site, before["path"]) == before["sha256"]
    conn = site.db()
    assert conn.execute("SELECT 1 FROM studies WHERE study_uid = ?", (elsewhere,)).fetchone() \
        is None
    conn.close()
    assert audits(site, "instance.replaced", sop) == []


def test_c_store_moving_an_instance_into_another_series_fails_and_is_audited(site, tmp_path):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    assert c_store(site, make_instance(study, series, 0, seed=1, sop_uid=sop), tmp_path) == 0
    before = row_of(site, sop)
    status = c_store(site, make_instance(study, generate_uid(), 0, seed=4, sop_uid=sop), tmp_path)
    assert status == 0xA900
    assert row_of(site, sop) == before
    (refused,) = audits(site, "instance.replace_refused", sop)
    assert json.loads(refused["detail"])["old_sha256"] == before["sha256"]
    incoming = site.data_dir / "studies" / ".incoming"
    assert [p.name for p in incoming.iterdir() if p.name != ".write.lock"] == []
