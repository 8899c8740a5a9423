"""Reconciliation of temporary identities in detail, at a small scale (the issue's own numbers,
50 × 3 with removal of the old copies at Orthanc and restore: test_patients_mass_casualty.py).

10 trauma registrations × 2 studies each (2 instances a study), pushed with storescu to the
real ``appliance dicom`` and forwarded by our outbox to Orthanc as the site PACS
(``OverwriteInstances``, no REST API declared); a signed report on 3 of them; then all 10
linked to real identities through the CLI's functions, and every corrected object queued
again by reconciliation and re-sent by the forwarding outbox: Orthanc then holds every
corrected instance under the real ID and (its ids hash the Patient ID, so a corrected
instance is not an overwrite) still the old copies, which, with no REST API to delete them,
are listed for the PACS administrator once a C-FIND shows the corrected copy under the real
ID.  Shown: no study left under a temporary ID in the index or in C-FIND, pixel data
byte-identical, the old values in the Original Attributes Sequence and Other Patient IDs
Sequence, the previous files kept as versions, the orders moved (worklist), the 3 reports
re-issued as signed correction addenda queued for delivery and each original marked
superseded by its addendum (where that shows: tests/test_reports_corrections.py), each link
audited with who and why; a replayed link, an inverted link and a self-merge change nothing; an unlink restores
the temporary identity the same way.  Then a scanner that typed a name wrong: flagged by
orders-meet-studies, put right with ``fix-study``, linked.

``appliance restore`` of the corrected identities: tests/test_patients_restore.py.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path

import pydicom
from conftest import require_tool
from dicom_data import write_series
from forwarding_site import add_destination
from orthanc import ORTHANC_BIN, Orthanc
from pydicom.dataset import Dataset
from test_patients import _cli

from appliance.core import config, db
from appliance.forwarding import outbox as forward_outbox
from appliance.forwarding import sending
from appliance.patients import orders as order_sql
from appliance.patients import registry, studies, superseded
from appliance.reports import corrections
from appliance.reports import model as reports
from dicom_node import query

NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def _pixels(site, conn) -> dict[str, bytes]:
    out = {}
    for sop, path in conn.execute("SELECT sop_uid, path FROM instances"):
        ds = pydicom.dcmread(site.data_dir / "studies" / path)
        out[sop] = ds.PixelData
    return out


def _cfind(conn, patient_id: str) -> list[str]:
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.PatientID = patient_id
    ident.StudyInstanceUID = ""
    ident.PatientName = ""
    return sorted(str(d.StudyInstanceUID) for d in query.find(conn, query.parse(
        ident, query.STUDY_ROOT)))


def _sign(conn, cfg, study_uid: str) -> int:
    from appliance.reports import delivery

    templates = reports.load_templates()
    rid = reports.create(conn, study_uid=study_uid, author="dr.ray", template_id="generic",
                         templates=templates)
    reports.autosave(conn, rid, actor="dr.ray", templates=templates, base_revision=0,
                     findings="Small left frontal contusion.", impression="Contusion.")
    delivery.sign(conn, cfg, rid, actor="dr.ray", level="final", templates=templates)
    return rid


def _storescu(dcmtk, port: int, aec: str, paths) -> None:
    r = subprocess.run([dcmtk["storescu"], "-aec", aec, "127.0.0.1", str(port),
                        *map(str, paths)], capture_output=True, text=True, timeout=120,
                       env=NODELAY)
    assert r.returncode == 0, r.stderr


def _pacs_instances(pacs: Orthanc, patient_id: str) -> int:
    import json

    return len(json.loads(pacs.request("POST", "/tools/find", json.dumps(
        {"Level": "Instance", "Query": {"PatientID": patient_id}}).encode())))


def test_trauma_identities_reconciled_everywhere_and_undone(dicom_site, dcmtk, tmp_path: Path,
                                                            monkeypatch, capsys):
    site = dicom_site
    pacs = Orthanc(tmp_path / "orthanc", binary=require_tool("Orthanc", ORTHANC_BIN),
                   extra_config={"OverwriteInstances": True, "DicomModalities": {
                       site.ae_title: [site.ae_title, "127.0.0.1", site.dicom_port]}}).start()
    cfg_path = site.data_dir / "appliance.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("formats: [sr]", "formats: [print]"))
    add_destination(site, pacs.aet, pacs.dicom_port)
    cfg = config.load(site.data_dir)
    desk = registry.Site.from_config(cfg)
    conn = db.open_db(cfg.db_path)
    temps, reals, paths = [], [], []
    for i in range(10):
        t = registry.register_trauma(conn, desk, actor="desk", sex_code="M", age_band="adult")
        registry.add_order(conn, desk, t["id"], actor="desk", procedure="CTHEAD")
        temps.append(t)
        reals.append(registry.register(conn, desk, actor="desk", name=f"Real^Person{i}",
                                       patient_id=f"MRN-{i}", birth="1970-01-01", sex_code="F"))
        for j in range(2):
            _, _, made = write_series(tmp_path / f"p{i}s{j}", 2, patient_id=t["patient_id"],
                                      patient_name=t["name"], accession=f"T{i}S{j}")
            paths += made
    _storescu(dcmtk, site.dicom_port, site.ae_title, paths)
    for (uid,) in conn.execute("SELECT study_uid FROM studies").fetchall():  # forward: PACS
        forward_outbox.enqueue_study(conn, uid, [pacs.aet], "routine")
    assert sending.run_due(cfg)["stored"] == 40
    assert _pacs_instances(pacs, temps[0]["patient_id"]) == 4
    study_of = {t["patient_id"]: _cfind(conn, t["patient_id"]) for t in temps}
    assert all(len(v) == 2 for v in study_of.values())
    signed = [_sign(conn, cfg, study_of[temps[k]["patient_id"]][0]) for k in (0, 1, 2)]
    before = _pixels(site, conn)
    assert len(before) == 40

    def cli(*args: str) -> tuple[int, str, str]:
        return _cli(monkeypatch, capsys, site.data_dir, "patient", *args)

    started = time.monotonic()
    for t, real in zip(temps, reals, strict=True):
        code, out, err = cli("link", t["patient_id"], real["patient_id"], "--reason",
                             "identified by family", "--json")
        assert code == 0, err
    took = time.monotonic() - started
    # Re-sent to the PACS by the forwarding outbox: every corrected instance queued again.
    assert conn.execute("SELECT count(*) FROM forward_outbox WHERE state = 'waiting'"
                        " AND origin = 'resend'").fetchone()[0] == 40
    assert sending.run_due(cfg)["stored"] == 40
    assert all(_pacs_instances(pacs, r["patient_id"]) == 4 for r in reals)
    # Orthanc names an instance by a hash of (PatientID, Study, Series, SOP Instance UID), so
    # a corrected PatientID is a new Orthanc instance: OverwriteInstances replaces only
    # same-patient copies and the old ones stay (40 + 40). With no REST API declared for it,
    # the superseded-copy sweep checks by C-FIND and lists them for the PACS administrator.
    assert len(pacs.instances()) == 80
    assert all(_pacs_instances(pacs, t["patient_id"]) == 4 for t in temps)
    assert superseded.run_due(cfg) == 40
    assert conn.execute("SELECT count(*) FROM superseded_copies WHERE state = 'manual'"
                        ).fetchone()[0] == 40
    assert len(pacs.instances()) == 80  # nothing deleted without an API

    # The index, C-FIND and the files: corrected, pixels untouched, old values kept.
    assert conn.execute("SELECT count(*) FROM studies WHERE patient_id LIKE ?",
                        (f"{desk.prefix}-T%",)).fetchone()[0] == 0
    for t, real in zip(temps, reals, strict=True):
        assert _cfind(conn, t["patient_id"]) == []
        assert _cfind(conn, real["patient_id"]) == study_of[t["patient_id"]]
    assert _pixels(site, conn) == before
    path = conn.execute("SELECT path FROM instances WHERE study_uid = ?",
                        (study_of[temps[0]["patient_id"]][0],)).fetchone()[0]
    ds = pydicom.dcmread(site.data_dir / "studies" / path)
    assert (ds.PatientID, str(ds.PatientName), ds.PatientBirthDate) == \
        ("MRN-0", "REAL^PERSON0", "19700101")
    old = ds.OriginalAttributesSequence[0]
    assert old.ModifiedAttributesSequence[0].PatientID == temps[0]["patient_id"]
    assert old.ReasonForTheAttributeModification == "CORRECT"
    assert [o.PatientID for o in ds.OtherPatientIDsSequence] == [temps[0]["patient_id"]]
    versions = conn.execute("SELECT path FROM instance_versions").fetchall()
    assert len(versions) == 40 and all((site.data_dir / "studies" / v[0]).exists()
                                       for v in versions)
    kept = pydicom.dcmread(io.BytesIO((site.data_dir / "studies" / versions[0][0]).read_bytes()))
    assert kept.PatientID.startswith(f"{desk.prefix}-T")  # the version as it came in

    # Orders (the worklist) follow; reports re-issued, never edited; audit names each link.
    assert {o["patient_ref"] for o in registry.orders_of(conn, reals[0]["id"])} == \
        {reals[0]["id"]}
    for k, rid in enumerate(signed):
        report = reports.get_report(conn, rid)
        assert report["status"] == "final"
        (add,) = reports.addenda(conn, rid)
        assert add["status"] == "final" and "Identity correction" in add["findings"]
        assert "REAL^PERSON" in add["findings"]
        mark = corrections.superseded_by(conn, report)  # marked, naming the addendum
        assert (mark["addendum_id"], mark["action"], mark["patient_id"]) == \
            (add["id"], "link", f"MRN-{k}")
    assert conn.execute("SELECT count(*) FROM deliveries d JOIN reports r ON r.id = d.report_id"
                        " WHERE r.kind = 'addendum'").fetchone()[0] == 3
    links = conn.execute("SELECT actor, object, detail FROM audit WHERE action = 'patient.link'"
                         " ORDER BY id").fetchall()
    assert [r[1] for r in links] == [t["patient_id"] for t in temps]
    assert all("identified by family" in r[2] and r[0].startswith("cli:") for r in links)

    # A replay, an inverted link and a self-merge change nothing.
    audit_rows = conn.execute("SELECT count(*) FROM audit").fetchone()[0]
    code, out, _ = cli("link", temps[0]["patient_id"], "MRN-0", "--reason", "again")
    assert code == 0 and "nothing changed" in out
    for bad in (["link", "MRN-0", temps[0]["patient_id"], "--reason", "inverted"],
                ["merge", "MRN-0", temps[0]["patient_id"], "--reason", "inverted"],
                ["merge", "MRN-1", "MRN-1", "--reason", "self"]):
        code, _, err = cli(*bad)
        assert code == 1 and err.startswith("error:"), (bad, err)
    assert conn.execute("SELECT count(*) FROM audit").fetchone()[0] == audit_rows
    assert conn.execute("SELECT count(*) FROM instance_versions").fetchone()[0] == 40

    # Unlink: the same way back.
    code, _, err = cli("unlink", temps[4]["patient_id"], "--reason", "wrong family")
    assert code == 0, err
    assert _cfind(conn, temps[4]["patient_id"]) == study_of[temps[4]["patient_id"]]
    assert _cfind(conn, "MRN-4") == []
    wl = conn.execute(f"SELECT patient_id FROM ({order_sql.WORKLIST_SQL})").fetchall()
    assert {r[0] for r in wl} == {*(f"MRN-{i}" for i in range(10) if i != 4),
                                  temps[4]["patient_id"]}  # the worklist follows
    assert _pixels(site, conn) == before

    # A scanner that typed the name wrong: flagged, then put right.
    order = registry.add_order(conn, desk, reals[1]["id"], actor="desk", procedure="CRCHEST")
    typo_uid, _, typo = write_series(tmp_path / "typo", 2, modality="CR", patient_id="MRN-1",
                                     patient_name="REAL^PERSN1", accession=order["accession"])
    r = subprocess.run([dcmtk["storescu"], "-aec", site.ae_title, "127.0.0.1",
                        str(site.dicom_port), *map(str, typo)], capture_output=True, text=True,
                       timeout=60, env=NODELAY)
    assert r.returncode == 0, r.stderr
    studies.sweep(cfg)
    flagged = studies.study_order(conn, typo_uid)
    assert flagged["flag"] == "mismatch"
    assert flagged["differences"] == {"patient_name": ["REAL^PERSN1", "REAL^PERSON1"]}
    code, _, err = cli("fix-study", typo_uid, "MRN-1", "--reason", "typed on the console")
    assert code == 0, err
    studies.sweep(cfg)
    assert studies.study_order(conn, typo_uid)["flag"] == "linked"
    conn.close()
    pacs.stop(kill=True)
    print(f"10 links of 4 instances each took {took:.2f} s")
